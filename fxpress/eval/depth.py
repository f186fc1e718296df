"""Depth super-resolution quality: RMSE in mm of ``(rgb, lr depth) -> depth`` on real depth tiles.

The data is the ``motorcycle-depth`` zoo dataset (:mod:`fxpress.zoo.gdnet`):
64x64 RGB tiles, their degraded 16x16 depth, the ground truth in mm and a
mask of the pixels to score (those with ground truth, each pixel of the
split once).  The RMSE is taken over all scored pixels of the split
together, not averaged per tile; lower is better.  ``bicubic_baseline``
scores plain bicubic upsampling of the same inputs, the reference a depth
model must beat.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from fxpress.errors import DataError
from fxpress.eval.batching import batch_size_for, fit_rows, fixed_dims
from fxpress.eval.sources import DEPTH_DATASETS
from fxpress.zoo import DepthDataset, load_dataset
from fxpress.zoo.gdnet import DATASET, bicubic_baseline

DEPTH_BATCH = 32  # tiles per call

__all__ = ["DEPTH_DATASETS", "bicubic_baseline", "depth_errors", "depth_rmse"]


def depth_errors(fn: Callable[..., Any], data: str | DepthDataset = DATASET, *, split: str = "test",
                 batch_size: int | None = None, max_items: int | None = None) -> torch.Tensor:
    """Float64 ``(pixels,)``: the signed error (mm) of `fn` at every scored pixel, in tile order."""
    dataset = _depth_dataset(data, split)
    count = len(dataset) if max_items is None else min(max_items, len(dataset))
    if count < 1:
        raise DataError(f"depth data {dataset.name} {dataset.split} has no tiles to score")
    _check_tile_shapes(fn, dataset)
    size = batch_size_for(fn, batch_size, DEPTH_BATCH)
    errors = []
    with torch.no_grad():
        for start in range(0, count, size):
            end = min(start + size, count)
            rgb, lr = dataset.rgb[start:end], dataset.lr[start:end]
            predicted = _output(fn(fit_rows(fn, rgb, size), fit_rows(fn, lr, size)))[:end - start]
            if predicted.shape != dataset.depth[start:end].shape:
                raise DataError(f"the depth model returned {tuple(predicted.shape)}; expected "
                                f"{tuple(dataset.depth[start:end].shape)} (tiles of depth in mm)")
            error = predicted.double() - dataset.depth[start:end].double()
            errors.append(error[dataset.valid[start:end]])
    return torch.cat(errors)


def depth_rmse(fn: Callable[..., Any], data: str | DepthDataset = DATASET, *, split: str = "test",
               batch_size: int | None = None, max_items: int | None = None) -> float:
    """Root mean squared error in mm of a depth model over every scored pixel of `data`'s `split`.

    `fn(rgb, lr)` takes RGB tiles ``(B, 3, 64, 64)`` in [0, 1] and degraded depth ``(B, 1, 16, 16)`` in mm
    and returns depth ``(B, 1, 64, 64)`` in mm.  `data`: ``motorcycle-depth`` (its `split`) or a
    ``DepthDataset``; `max_items` scores only the first tiles.  Batches hold `batch_size` tiles (default
    32), or the model's static batch size.
    """
    errors = depth_errors(fn, data, split=split, batch_size=batch_size, max_items=max_items)
    return math.sqrt(float((errors ** 2).mean()))


def _depth_dataset(data: str | DepthDataset, split: str) -> DepthDataset:
    if isinstance(data, str):
        if data not in DEPTH_DATASETS:
            raise DataError(f"depth RMSE needs a depth dataset ({', '.join(DEPTH_DATASETS)}), not {data!r}")
        data = load_dataset(data, split)
    if not isinstance(data, DepthDataset):
        raise DataError(f"depth RMSE needs a DepthDataset or its name, got {type(data).__name__}")
    return data


def _check_tile_shapes(fn: Any, dataset: DepthDataset) -> None:
    """DataError if `fn` fixes a per-tile dim (channels, height, width) that the tiles do not have."""
    for fixed, tiles, what in zip(fixed_dims(fn), (dataset.rgb, dataset.lr), ("rgb", "depth")):
        wrong = {d: size for d, size in fixed.items() if d > 0 and (d >= tiles.dim() or tiles.shape[d] != size)}
        if wrong:
            wanted = ", ".join(f"dim {d} = {size}" for d, size in sorted(wrong.items()))
            raise DataError(f"depth data {dataset.name}: {what} tiles of shape {tuple(tiles.shape[1:])} do not "
                            f"fit the model, which takes {wanted}")


def _output(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"the depth model returned {type(output).__name__}; depth RMSE needs a tensor")
