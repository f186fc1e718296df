"""The metrics on graphs captured from a batch of one (dynamic by default for Hugging Face models) and
evaluated at batch 4 give the eager model's scores."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.eval import accuracy, mrr, perplexity
from hf_factories import minilm_tokenizer, tiny_model

TEXT = "A graph captured from one example still scores text in batches of four, as the model would. " * 20


def test_perplexity_of_a_raw_causal_lm_captured_at_batch_one():
    model = tiny_model("llama")
    graph = fxpress.capture(model, (torch.randint(0, 1000, (1, 8)),))
    assert "dims batch, seq" in graph.wrapper
    tokenizer = minilm_tokenizer()
    seen = []
    graph.module.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    got = perplexity(graph, TEXT, tokenizer=tokenizer, batch_size=4, block_len=32)
    assert seen and seen[0][0] == 4
    assert got == pytest.approx(perplexity(model, TEXT, tokenizer=tokenizer, batch_size=4, block_len=32), rel=1e-5)


def test_mrr_of_a_raw_encoder_captured_at_batch_one():
    model = tiny_model("bert")
    ids = torch.randint(0, 1000, (1, 6))
    graph = fxpress.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    tokenizer = minilm_tokenizer()
    got = mrr(graph, tokenizer, "stdlib-docs", max_items=24, batch_size=4)
    assert got == pytest.approx(mrr(model, tokenizer, "stdlib-docs", max_items=24, batch_size=4), rel=1e-5)


def test_accuracy_of_a_raw_image_classifier_captured_at_batch_one():
    model = tiny_model("vit")
    graph = fxpress.capture(model, {"pixel_values": torch.randn(1, 1, 28, 28)})
    assert graph.wrapper.endswith("dynamic: input 0 dims batch")
    got = accuracy(graph, "mnist-5k", max_items=16, batch_size=4)
    assert got == accuracy(model, "mnist-5k", max_items=16, batch_size=4)
