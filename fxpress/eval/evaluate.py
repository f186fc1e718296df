"""Task metrics and calibration data for zoo models.

`evaluate(model, fn)` scores any callable standing in for the model (the
eager module, a captured or compressed Graph, later a compiled artifact)
on the model's held-out data: accuracy for classifiers, perplexity on
pydoc topics for causal LMs, retrieval MRR on stdlib-docs for sentence
encoders (``fxpress.eval.retrieval``).  `calibration_batches` draws inputs
from the training side of the same data, never from the held-out split;
`task_loss_for` gives the loss passes should score and train with.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from fxpress.eval.retrieval import MAX_LEN, docs_mrr
from fxpress.training.losses import contrastive_loss, paired_batches
from fxpress.zoo import ImageDataset, ZooModel, load_dataset, text_blocks

EVAL_BATCH = 256
LM_BLOCK_LEN = 64
LM_EVAL_BLOCKS = 8  # default held-out blocks for perplexity; 64 or more to compare methods
PAIRS_PER_BATCH = 8  # calibration batches of an encoder: 8 (query, document) pairs = 16 rows


def evaluate(model: ZooModel, fn: Callable[..., Any], *, max_items: int | None = None,
             blocks: int | None = None) -> dict[str, float]:
    """Task metrics of `fn` (called like model.module) on the model's held-out data.

    `max_items` caps the images (classifiers), query/document pairs (encoders: all ~1200 held-out
    stdlib-docs pairs by default) or token blocks (causal LMs); `blocks` sets the number of
    LM_BLOCK_LEN-token blocks for perplexity (default LM_EVAL_BLOCKS, or `max_items`).
    """
    if model.task == "classification" and model.dataset:
        return {"accuracy": classification_accuracy(fn, load_dataset(model.dataset, "test"), max_items)}
    if model.task == "causal-lm" and model.tokenizer is not None:
        count = blocks or max_items or LM_EVAL_BLOCKS
        return {"perplexity": perplexity(fn, _lm_blocks(model, "pydoc-topics", "test", count))}
    if model.task == "embedding" and model.tokenizer is not None:
        return {"mrr": docs_mrr(fn, model.tokenizer, "test", max_items)}
    return {}


def task_loss_for(model: ZooModel) -> Callable[[Any, tuple], torch.Tensor] | None:
    """The loss a PassContext should carry for `model` (`PassContext(loss=...)`): the contrastive
    retrieval loss for encoders (with `calibration_batches`' paired batches); None otherwise, where the
    context's default (next-token cross-entropy for causal-LM logits) applies."""
    return contrastive_loss if model.task == "embedding" else None


def classification_accuracy(fn: Callable[..., Any], dataset: ImageDataset, max_items: int | None = None) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in dataset.batches(EVAL_BATCH):
            if max_items is not None and total >= max_items:
                break
            correct += int((fn(images).argmax(-1) == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


def perplexity(fn: Callable[..., Any], blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) of a logits function over token blocks."""
    losses = []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size]
            logits = fn(ids)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
            losses.append((float(loss), ids[:, 1:].numel()))
    return math.exp(sum(l for l, _ in losses) / sum(n for _, n in losses))


def _lm_blocks(model: ZooModel, dataset: str, split: str, count: int) -> torch.Tensor:
    return text_blocks(model.tokenizer, load_dataset(dataset, split).text, LM_BLOCK_LEN, max_blocks=count)


def calibration_batches(model: ZooModel, count: int = 4, batch_size: int | None = None) -> list[tuple]:
    """`count` input batches like `model.example_inputs`, from training-side data.

    Classifiers: images from the "train" split.  Causal LMs: Shakespeare
    token blocks.  Encoders: paired batches (queries, then their documents;
    see `fxpress.training.losses`) of `batch_size` pairs (default 8) from the
    stdlib-docs "train" split, MAX_LEN tokens.  Other models: their example
    inputs, repeated.
    """
    if model.task == "classification" and model.dataset:
        size = batch_size or 32
        images = load_dataset(model.dataset, "train").images
        return [(images[i * size:(i + 1) * size],) for i in range(count)]
    if model.task == "causal-lm" and model.tokenizer is not None:
        size = batch_size or 2
        blocks = _lm_blocks(model, "shakespeare", "train", count * size)
        return [(blocks[i * size:(i + 1) * size],) for i in range(count)]
    if model.task == "embedding" and model.tokenizer is not None:
        size = batch_size or PAIRS_PER_BATCH
        train = load_dataset("stdlib-docs", "train", max_items=count * size)
        return paired_batches(model.tokenizer, list(zip(train.titles, train.texts)), size, MAX_LEN)[:count]
    return [tuple(model.example_inputs) for _ in range(count)]
