"""Task metrics and calibration data for zoo models.

`evaluate(model, fn)` scores any callable standing in for the model (the
eager module, a captured or compressed Graph, a compiled model) on the
model's held-out data: accuracy for classifiers, perplexity on pydoc
topics for causal LMs, retrieval MRR on stdlib-docs for sentence encoders
(``fxpress.eval.retrieval``), RMSE in mm (lower is better) for depth
super-resolution (``fxpress.eval.depth``); `data` picks another source instead
(``text:FILE`` or a dataset name, see :mod:`fxpress.eval.sources`).
`calibration_batches` draws inputs from the training side of the same
data (or from a chosen source), never from the held-out split;
`task_loss_for` gives the loss passes should score and train with.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

from fxpress.errors import DataError
from fxpress.eval.batching import batch_size_for, fit_rows, fixed_size, seq_len_for
from fxpress.eval.depth import bicubic_baseline, depth_rmse
from fxpress.eval.metrics import (EVAL_BATCH, LM_BLOCK_LEN, accuracy, check_image_shape,  # noqa: F401
                                  mrr, perplexity, token_blocks)
from fxpress.eval.retrieval import DOCS, MAX_LEN, docs_mrr  # noqa: F401 - docs_mrr: kept importable here
from fxpress.eval.sources import Source, check_fits, load_text, parse_source
from fxpress.training.losses import contrastive_loss, paired_batches
from fxpress.zoo import ImageDataset, ZooModel, load_dataset, text_blocks

log = logging.getLogger(__name__)

LM_EVAL_BLOCKS = 8  # default held-out blocks for perplexity; 64 or more to compare methods
LM_EVAL_TEXT = "pydoc-topics"  # a causal LM's default held-out text
LM_CALIBRATION_TEXT = "shakespeare"  # ... and its default calibration text
PAIRS_PER_BATCH = 8  # calibration batches of an encoder: 8 (query, document) pairs = 16 rows
DEPTH_CALIBRATION_BATCH = 8  # calibration tiles per batch of a depth model
DATASET_TASKS = ("classification", "depth-sr")  # tasks scored on the model's own dataset by default


def evaluate(model: ZooModel, fn: Callable[..., Any], data: str | Source = "default", *,
             max_items: int | None = None, blocks: int | None = None,
             batch_size: int | None = None) -> dict[str, float]:
    """Task metric of `fn` (called like model.module) on held-out data: {"accuracy" | "perplexity" | "mrr": value},
    or for depth super-resolution {"rmse_mm": value, "bicubic_rmse_mm": bicubic upsampling's, for reference}.

    `data`: "default" (the model's own held-out split; {} for a task without a metric), ``text:FILE``
    (causal LMs) or a dataset name fitting the task (DataError otherwise); datasets are scored on
    their "test" split, files whole.  `max_items` caps the images (classifiers), query/document pairs
    (encoders: all ~1200 held-out stdlib-docs pairs by default), tiles (depth) or token blocks (causal LMs); `blocks`
    sets the number of LM_BLOCK_LEN-token blocks for perplexity (default LM_EVAL_BLOCKS for a dataset,
    every block of a text file).  `batch_size` applies where `fn` allows it (see fxpress.eval.batching).
    """
    source = parse_source(data)
    if source.kind == "default" and not has_default_metric(model):
        return {}
    check_evaluable(model, source)
    if model.task == "classification":
        dataset = model.dataset if source.kind == "default" else source.value
        return {"accuracy": accuracy(fn, dataset, split="test", batch_size=batch_size, max_items=max_items)}
    if model.task == "depth-sr":
        dataset = model.dataset if source.kind == "default" else source.value
        return {"rmse_mm": depth_rmse(fn, dataset, split="test", batch_size=batch_size, max_items=max_items),
                "bicubic_rmse_mm": depth_rmse(bicubic_baseline, dataset, split="test", max_items=max_items)}
    tokenizer = _tokenizer(model)
    if model.task == "causal-lm":
        text = Source("dataset", LM_EVAL_TEXT) if source.kind == "default" else source
        count = blocks or max_items or (None if text.kind == "text" else LM_EVAL_BLOCKS)
        return {"perplexity": perplexity(fn, text, tokenizer=tokenizer, max_blocks=count, batch_size=batch_size)}
    dataset = DOCS if source.kind == "default" else source.value
    return {"mrr": mrr(fn, tokenizer, dataset, split="test", max_items=max_items, batch_size=batch_size)}


def describe_data(model: ZooModel, data: str | Source = "default") -> str:
    """What `evaluate(model, fn, data)` scores on, in words: ``mnist-5k test``, ``text:notes.txt``."""
    source = parse_source(data)
    if source.kind == "text":
        return str(source)
    if source.kind == "dataset":
        return f"{source.value} test"
    default = {"classification": model.dataset, "depth-sr": model.dataset, "causal-lm": LM_EVAL_TEXT,
               "embedding": DOCS}.get(model.task)
    return f"{default} test" if default else "default"


def has_default_metric(model: ZooModel) -> bool:
    """Whether `evaluate(model, fn)` has data to score: a classifier's or depth model's dataset, a language
    model's tokenizer."""
    if model.task in DATASET_TASKS:
        return bool(model.dataset)
    return model.task in ("causal-lm", "embedding") and model.tokenizer is not None


def check_evaluable(model: ZooModel, data: str | Source = "default", purpose: str = "evaluation") -> None:
    """DataError unless `model` can be scored (or calibrated) on `data`: the task has a metric, the source
    fits it, and the model has what it needs (a dataset for `default` classifiers, a tokenizer for text)."""
    source = parse_source(data)
    check_fits(source, model.task, model.name, purpose)
    if source.kind == "default" and model.task in DATASET_TASKS and not model.dataset:
        raise DataError(f"{purpose} of {model.name}: the {model.task} model names no dataset; use a dataset "
                        f"that fits it or a ZooModel with dataset=...")
    if model.task not in DATASET_TASKS:
        _tokenizer(model)


def _tokenizer(model: ZooModel) -> Any:
    if model.tokenizer is None:
        raise DataError(f"model {model.name} has no tokenizer: a {model.task} model is scored on text "
                        f"(a factory can return a ZooModel with tokenizer=...)")
    return model.tokenizer


def task_loss_for(model: ZooModel) -> Callable[[Any, tuple], torch.Tensor] | None:
    """The loss a PassContext should carry for `model` (`PassContext(loss=...)`): the contrastive
    retrieval loss for encoders (with `calibration_batches`' paired batches); None otherwise, where the
    context's default (next-token cross-entropy for causal-LM logits) applies."""
    return contrastive_loss if model.task == "embedding" else None


def classification_accuracy(fn: Callable[..., Any], dataset: ImageDataset, max_items: int | None = None) -> float:
    """Top-1 accuracy on `dataset` (see :func:`fxpress.eval.accuracy`)."""
    return accuracy(fn, dataset, max_items=max_items)


def _lm_blocks(model: ZooModel, dataset: str, split: str, count: int) -> torch.Tensor:
    return text_blocks(model.tokenizer, load_dataset(dataset, split).text, LM_BLOCK_LEN, max_blocks=count)


def calibration_batches(model: ZooModel, count: int = 4, batch_size: int | None = None, *,
                        source: str | Source = "default", like: Any = None, split: str = "train") -> list[tuple]:
    """`count` input batches like `model.example_inputs`, from training-side data.

    Classifiers: images from the "train" split.  Depth models: ``(rgb, lr)`` tiles
    of the "train" split, `batch_size` (default 8) a batch.  Causal LMs: Shakespeare
    token blocks.  Encoders: paired batches (queries, then their documents;
    see `fxpress.training.losses`) of `batch_size` pairs (default 8) from the
    stdlib-docs "train" split, MAX_LEN tokens.  Other models: their example
    inputs, repeated.

    `source`: ``text:FILE`` (causal LMs: blocks from the whole file) or a dataset name fitting the task
    (its `split`: "train" unless asked, see fxpress.zoo.datasets) instead of the default.  `like`: the
    Graph or compiled model the batches are for; its static batch size and sequence length win over the
    defaults.  A text too short for `count` batches gives fewer (at least one); `count=0` gives none.
    """
    if count < 0:
        raise DataError(f"calibration batches must be >= 0, got {count}")
    if count == 0:
        return []
    source = parse_source(source)
    fit = like if like is not None else model.module
    if source.kind == "default" and not has_default_metric(model):
        return [tuple(model.example_inputs) for _ in range(count)]
    check_evaluable(model, source, "calibration")
    if model.task == "classification":
        name = model.dataset if source.kind == "default" else source.value
        images = load_dataset(name, split).images
        check_image_shape(fit, images, f"calibration data {name}")
        size = batch_size_for(fit, batch_size, 32)
        return [(fit_rows(fit, images[rows], size),) for rows in spread_rows(len(images), count, size)]
    if model.task == "depth-sr":
        return _depth_calibration(model, source, count, batch_size, fit, split)
    if model.task == "causal-lm":
        return _lm_calibration(model, source, count, batch_size, fit, split)
    return _encoder_calibration(model, source, count, batch_size, fit, split)


def spread_rows(total: int, count: int, size: int) -> list[torch.Tensor]:
    """Row indices of up to `count` batches of `size`, each spread over all `total` rows of a split.

    Datasets may be stored sorted by label (mnist-5k's training rows are): the first rows would be a
    few classes only (16 x 100 images: digits 0-3), and a codebook or Hessian fitted to them hurts the
    others.  Batch b takes every `count`-th of `count * size` evenly spaced rows, starting at b.
    """
    batches = max(1, min(count, total // max(size, 1)))
    chosen = torch.arange(batches * size) * total // (batches * size)
    return [chosen[start::batches] for start in range(batches)]


def _depth_calibration(model: ZooModel, source: Source, count: int, batch_size: int | None,
                       fit: Any, split: str = "train") -> list[tuple]:
    tiles = load_dataset(model.dataset if source.kind == "default" else source.value, split)
    size = batch_size_for(fit, batch_size, DEPTH_CALIBRATION_BATCH)
    return [(fit_rows(fit, tiles.rgb[start:start + size], size), fit_rows(fit, tiles.lr[start:start + size], size))
            for start in range(0, min(len(tiles), count * size), size)]


def _lm_calibration(model: ZooModel, source: Source, count: int, batch_size: int | None,
                    fit: Any, split: str = "train") -> list[tuple]:
    size = batch_size_for(fit, batch_size, 2)
    length = seq_len_for(fit, None, LM_BLOCK_LEN)
    text = load_text(Source("dataset", LM_CALIBRATION_TEXT) if source.kind == "default" else source, split)
    blocks = token_blocks(_tokenizer(model), text, length, count * size, f"calibration data {source}")
    if len(blocks) < count * size:
        log.warning("calibration data %s has %d blocks of %d tokens: %d batches instead of %d",
                    source, len(blocks), length, math.ceil(len(blocks) / size), count)
    return [(fit_rows(fit, blocks[start:start + size], size),) for start in range(0, len(blocks), size)][:count]


def _encoder_calibration(model: ZooModel, source: Source, count: int, batch_size: int | None,
                         fit: Any, split: str = "train") -> list[tuple]:
    rows = fixed_size(fit, 0)
    if rows is not None and (rows % 2 or (batch_size is not None and 2 * batch_size != rows)):
        raise DataError(f"an encoder calibrates on (query, document) pairs: its static batch of {rows} rows "
                        f"must be even and hold 2 * batch_size rows")
    size = rows // 2 if rows is not None else batch_size or PAIRS_PER_BATCH
    max_len = seq_len_for(fit, None, MAX_LEN)
    name = DOCS if source.kind == "default" else source.value
    train = load_dataset(name, split, max_items=count * size)
    if len(train) < size:
        raise DataError(f"calibration data {name} has {len(train)} pairs, fewer than one batch of {size}")
    return paired_batches(_tokenizer(model), list(zip(train.titles, train.texts)), size, max_len)[:count]
