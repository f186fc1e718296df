"""Retrieval metrics: reciprocal ranks, stdlib-docs / pydoc scoring, and the encoder's evaluation wiring."""
from __future__ import annotations

import pytest
import torch

from fxpress.eval.evaluate import calibration_batches, evaluate, task_loss_for
from fxpress.eval.retrieval import (
    docs_mrr,
    docs_reciprocal_ranks,
    mean_reciprocal_rank,
    pydoc_mrr,
    pydoc_reciprocal_ranks,
    reciprocal_ranks,
)
from fxpress.training.losses import contrastive_loss
from fxpress.zoo import ZooModel, load_dataset

torch.set_num_threads(1)


def bag_of_tokens(vocab: int = 30522, width: int = 64):
    """A stand-in encoder: fixed random token embeddings, no context (a bag-of-words retriever)."""
    table = torch.randn(vocab, width, generator=torch.Generator().manual_seed(0))
    return lambda ids, mask: table[ids]


def test_reciprocal_ranks_of_known_scores():
    queries = torch.eye(3)
    documents = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0.5, 0.9]])
    # query 0: its doc is first; query 1: doc 2 (0.5) beats its doc (0); query 2: doc 1 (1.0) beats its doc (0.9)
    assert reciprocal_ranks(queries, documents).tolist() == [1.0, 0.5, 0.5]
    assert mean_reciprocal_rank(queries, documents) == pytest.approx(2 / 3)


def test_docs_ranks_are_per_query_and_beat_chance_for_a_bag_of_tokens(zoo_model):
    tokenizer = zoo_model("minilm").tokenizer
    fn = bag_of_tokens()
    ranks = docs_reciprocal_ranks(fn, tokenizer, max_items=48)
    assert ranks.shape == (48,) and ranks.dtype == torch.float64
    assert bool(((ranks > 0) & (ranks <= 1)).all())
    chance = sum(1 / r for r in range(1, 49)) / 48
    assert float(ranks.mean()) > 2 * chance
    assert docs_mrr(fn, tokenizer, max_items=48) == pytest.approx(float(ranks.mean()))


def test_pydoc_ranks_cover_every_topic(zoo_model):
    tokenizer = zoo_model("minilm").tokenizer
    fn = bag_of_tokens()
    ranks = pydoc_reciprocal_ranks(fn, tokenizer)
    assert len(ranks) == len(load_dataset("pydoc-topics", "all"))
    assert pydoc_mrr(fn, tokenizer) == pytest.approx(float(ranks.mean()))


def test_encoder_evaluation_is_docs_mrr_and_minilm_retrieves_well(zoo_model):
    model = zoo_model("minilm")
    metrics = evaluate(model, model.module, max_items=16)
    assert set(metrics) == {"mrr"} and metrics["mrr"] > 0.6


def test_encoder_calibration_is_paired_train_pairs_and_its_loss_is_contrastive(zoo_model):
    model = zoo_model("minilm")
    batches = calibration_batches(model, count=2, batch_size=4)
    assert len(batches) == 2 and all(ids.shape == mask.shape == (8, 128) for ids, mask in batches)
    train = load_dataset("stdlib-docs", "train", max_items=8)
    first = model.tokenizer.decode(batches[1][0][0], skip_special_tokens=True)
    assert first.replace(" ", "") == train.titles[4].lower()
    assert task_loss_for(model) is contrastive_loss
    with torch.no_grad():
        assert float(contrastive_loss(model.module(*batches[0]), batches[0])) >= 0


def test_lm_perplexity_uses_the_requested_number_of_blocks(zoo_model):
    """Uniform logits have perplexity = vocabulary size; 64 held-out blocks of 64 tokens exist."""
    tokenizer = zoo_model("minilm").tokenizer
    vocab = len(tokenizer)
    seen = []

    def uniform(ids):
        seen.append(ids.shape)
        return torch.zeros(*ids.shape, vocab)

    lm = ZooModel(name="uniform", module=torch.nn.Identity(), example_inputs=(), description="", task="causal-lm",
                  tokenizer=tokenizer)
    metrics = evaluate(lm, uniform, blocks=64)
    assert metrics["perplexity"] == pytest.approx(vocab)
    assert sum(shape[0] for shape in seen) == 64 and all(shape[1] == 64 for shape in seen)
    assert task_loss_for(lm) is None
