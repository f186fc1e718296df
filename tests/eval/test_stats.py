"""Bootstrap intervals: exact on degenerate data, sized like the normal theory, paired beats unpaired."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fxpress.eval.stats import Interval, mean_ci, paired_bootstrap

torch.set_num_threads(1)


def test_identical_scores_give_a_zero_difference_with_a_zero_width_interval():
    scores = np.random.default_rng(0).random(50)
    assert paired_bootstrap(scores, scores) == (0.0, 0.0, 0.0)


def test_a_constant_shift_is_recovered_exactly():
    b = np.random.default_rng(1).random(200)
    diff, low, high = paired_bootstrap(b + 0.1, b)
    assert diff == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_the_interval_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(2)
    a, b = rng.random(300), rng.random(300)
    first = paired_bootstrap(a, b, seed=3)
    assert isinstance(first, Interval) and first == paired_bootstrap(a, b, seed=3)
    assert first != paired_bootstrap(a, b, seed=4)
    assert first.low <= first.estimate <= first.high
    assert first.estimate == pytest.approx(a.mean() - b.mean())


def test_mean_ci_width_matches_the_normal_approximation():
    values = np.random.default_rng(5).normal(size=400)
    mean, low, high = mean_ci(values, rounds=4000)
    expected = 2 * 1.96 * values.std() / np.sqrt(values.size)
    assert mean == pytest.approx(values.mean())
    assert high - low == pytest.approx(expected, rel=0.15)
    narrow = mean_ci(values, rounds=4000, level=0.5)
    assert narrow.high - narrow.low < high - low


def test_pairing_separates_correlated_methods_that_unpaired_intervals_cannot():
    """Two methods with per-item scores that move together: the paired CI excludes 0, the separate CIs overlap."""
    items = np.random.default_rng(6).random(300)
    better, worse = items + 0.02, items
    assert paired_bootstrap(better, worse).low > 0
    assert mean_ci(better).low < mean_ci(worse).high


def test_torch_tensors_and_lists_are_accepted():
    ranks = torch.tensor([1.0, 0.5, 0.25, 1.0], dtype=torch.float64)
    assert mean_ci(ranks).estimate == pytest.approx(0.6875)
    assert paired_bootstrap([1.0, 0.5], [0.5, 0.5]).estimate == pytest.approx(0.25)


@pytest.mark.parametrize("call", [
    lambda: paired_bootstrap([1.0, 2.0], [1.0]),
    lambda: paired_bootstrap([], []),
    lambda: mean_ci([1.0, float("nan")]),
    lambda: mean_ci([1.0], level=1.0),
    lambda: mean_ci([1.0], rounds=0),
])
def test_bad_input_raises_a_clear_error(call):
    with pytest.raises(ValueError):
        call()
