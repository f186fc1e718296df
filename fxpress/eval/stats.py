"""Confidence intervals for evaluation scores: is method A better than method B, or is it noise?

Both methods are scored on the same items (per-query reciprocal ranks,
per-image correctness), so the comparison is *paired*: the bootstrap
resamples items, keeping each item's two scores together, and the
interval is the percentile interval of the resampled mean difference.
An interval that excludes 0 says the difference is larger than what
re-drawing the evaluation set would explain.  Seeded, so reproducible.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

ROUNDS = 2000
LEVEL = 0.95
_CHUNK = 1 << 22  # resampled indices drawn at a time (memory bound for large sets)


class Interval(NamedTuple):
    """A point estimate and its confidence interval [low, high]."""

    estimate: float
    low: float
    high: float


def _scores(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what}: no scores")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: scores must be finite")
    return array


def _bootstrap_means(values: np.ndarray, rounds: int, seed: int) -> np.ndarray:
    """Means of `rounds` resamples (with replacement, same size) of `values`."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK // values.size)
    means = []
    for start in range(0, rounds, per_chunk):
        draws = rng.integers(0, values.size, size=(min(per_chunk, rounds - start), values.size))
        means.append(values[draws].mean(axis=1))
    return np.concatenate(means)


def _interval(estimate: float, means: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high))


def _check(rounds: int, level: float) -> None:
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def mean_ci(scores: Sequence[float] | np.ndarray, rounds: int = ROUNDS, seed: int = 0,
            level: float = LEVEL) -> Interval:
    """(mean, low, high): the mean of per-item `scores` and its percentile-bootstrap interval."""
    _check(rounds, level)
    values = _scores(scores, "mean_ci")
    return _interval(values.mean(), _bootstrap_means(values, rounds, seed), level)


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, rounds: int = ROUNDS,
                     seed: int = 0, level: float = LEVEL) -> Interval:
    """(mean(a) - mean(b), low, high): the paired-bootstrap interval of the difference of two methods'
    mean scores on the same items (a[i] and b[i] score item i)."""
    _check(rounds, level)
    first, second = _scores(a, "paired_bootstrap a"), _scores(b, "paired_bootstrap b")
    if first.shape != second.shape:
        raise ValueError(f"paired_bootstrap needs scores of the same items: got {first.size} and {second.size}")
    differences = first - second
    return _interval(differences.mean(), _bootstrap_means(differences, rounds, seed), level)
