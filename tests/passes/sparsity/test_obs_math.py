"""obs_math: the blocked inverse Fisher, OBS scores and updates, and the layer-wise form against dense references."""
from __future__ import annotations

import pytest
import torch

from fxpress.passes.sparsity import obs_math
from fxpress.passes.sparsity.obs_math import (
    FisherSums, expand_groups, flatten_blocks, inverse_fisher, layer_hessian, layerwise_prune, obs_scores,
    obs_update, select_keep, unflatten_blocks, woodbury_inverse)

torch.set_num_threads(1)


def gradients(m: int = 12, n: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def dense_fisher(grads: torch.Tensor, fisher_block: int, lam: float) -> torch.Tensor:
    """The block-diagonal Fisher written out as an (n, n) float64 matrix."""
    g = grads.double()
    blocks = []
    for start in range(0, g.shape[1], fisher_block):
        part = g[:, start:start + fisher_block]
        blocks.append(lam * torch.eye(fisher_block, dtype=torch.float64) + part.T @ part / g.shape[0])
    return torch.block_diag(*blocks)


def blocks_of(matrix: torch.Tensor, size: int) -> torch.Tensor:
    return torch.stack([matrix[s:s + size, s:s + size] for s in range(0, matrix.shape[0], size)])


@pytest.mark.parametrize("fisher_block", [4, 8, 16])
def test_woodbury_and_closed_form_equal_the_explicit_block_inverse(fisher_block, monkeypatch):
    monkeypatch.setattr(obs_math, "CHUNK_ELEMENTS", 2 * fisher_block * fisher_block)  # several chunks
    grads, lam = gradients(), 0.3
    explicit = torch.linalg.inv(blocks_of(dense_fisher(grads, fisher_block, lam), fisher_block))
    torch.testing.assert_close(woodbury_inverse(grads, fisher_block, lam).double(), explicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inverse_fisher(grads, fisher_block, lam).double(), explicit, rtol=1e-5, atol=1e-6)


def test_relative_damping_is_damp_times_mean_square_gradient():
    grads = gradients() * 1e-3
    sums = FisherSums(grads.shape[1], 8)
    for g in grads:
        sums.add(g)
    lam = 0.15 * float((grads.double() ** 2).mean())
    assert sums.damping(0.15) == pytest.approx(lam, rel=1e-5)
    torch.testing.assert_close(sums.inverse(0.15), inverse_fisher(grads, 8, lam), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sums.mean_squares(), (grads ** 2).mean(0))
    with pytest.raises(ValueError, match="does not divide"):
        FisherSums(50, 16)


def test_pruning_order_keeps_each_group_consecutive():
    weight = torch.arange(8 * 12.0).reshape(8, 12)
    rows = flatten_blocks(weight, "4x1").view(-1, 4)
    assert torch.equal(rows[0], weight[0:4, 0]) and torch.equal(rows[1], weight[4:8, 0])
    cols = flatten_blocks(weight, "1x4").view(-1, 4)
    assert torch.equal(cols[0], weight[0, 0:4]) and torch.equal(cols[3], weight[1, 0:4])
    for block in ("1", "1x4", "4x1"):
        assert torch.equal(unflatten_blocks(flatten_blocks(weight, block), (8, 12), block), weight)


@pytest.mark.parametrize("q", [1, 4])
def test_scores_and_update_equal_the_dense_formulas(q):
    n, fisher_block, lam = 48, 8, 0.2
    grads, w = gradients(n=n), gradients(m=1, n=n, seed=3)[0]
    fisher = dense_fisher(grads, fisher_block, lam)
    finv_dense = torch.linalg.inv(fisher)
    finv = inverse_fisher(grads, fisher_block, lam)
    groups = [list(range(s, s + q)) for s in range(0, n, q)]
    wd = w.double()
    expected = torch.stack([0.5 * wd[g] @ torch.linalg.inv(finv_dense[g][:, g]) @ wd[g] for g in groups])
    torch.testing.assert_close(obs_scores(w, finv, q).double(), expected, rtol=1e-4, atol=1e-6)

    keep = select_keep(obs_scores(w, finv, q), 0.5)
    delta = torch.zeros(n, dtype=torch.float64)
    for index, g in enumerate(groups):
        if not keep[index]:
            delta -= finv_dense[:, g] @ torch.linalg.inv(finv_dense[g][:, g]) @ wd[g]
    keep_weights = expand_groups(keep, q)
    expected_w = (wd + delta) * keep_weights
    torch.testing.assert_close(obs_update(w, finv, keep_weights, q).double(), expected_w, rtol=1e-4, atol=1e-5)


def test_one_group_removed_costs_its_score():
    """OBS: removing one group by its update zeroes it exactly and raises 1/2 dw^T F dw by exactly rho."""
    n, fisher_block, lam, q = 16, 8, 0.1, 4
    grads, w = gradients(n=n), gradients(m=1, n=n, seed=5)[0]
    fisher = dense_fisher(grads, fisher_block, lam)
    finv = inverse_fisher(grads, fisher_block, lam)
    keep = torch.ones(n // q, dtype=torch.bool)
    keep[1] = False
    finv_dense = torch.linalg.inv(fisher)
    g = list(range(4, 8))
    delta = -finv_dense[:, g] @ torch.linalg.inv(finv_dense[g][:, g]) @ w.double()[g]
    assert torch.allclose(w.double()[g] + delta[g], torch.zeros(4, dtype=torch.float64), atol=1e-10)
    kept = expand_groups(keep, q)
    updated = obs_update(w, finv, kept, q).double()
    torch.testing.assert_close(updated, (w.double() + delta) * kept, rtol=1e-4, atol=1e-5)
    assert float(0.5 * delta @ fisher @ delta) == pytest.approx(float(obs_scores(w, finv, q)[1]), rel=1e-4)


def test_select_keep_counts_and_forces_pruned_groups():
    scores = torch.tensor([5.0, 1.0, 3.0, 4.0, 2.0, 6.0])
    assert select_keep(scores, 0.5).tolist() == [True, False, False, True, False, True]
    pruned = torch.tensor([False, False, False, False, False, True])
    assert select_keep(scores, 0.5, pruned).tolist() == [True, False, True, True, False, False]
    assert select_keep(scores, 0.0).all()


def sequential_obs(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Dense reference of the layer-wise update: per row, visit columns left to right; a removed column j
    is pruned by OBS against the Hessian of the columns not yet visited, H[j:, j:]."""
    w = weight.double().clone()
    for j in range(w.shape[1]):
        inverse = torch.linalg.inv(hessian[j:, j:])
        for r in range(w.shape[0]):
            if not keep[r, j]:
                w[r, j:] -= w[r, j] / inverse[0, 0] * inverse[:, 0]
    return w * keep


def layer_data(out_features: int = 8, in_features: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, in_features, generator=generator) @ torch.randn(in_features, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    return weight, x, layer_hessian(x.double().T @ x.double(), x.shape[0], 0.01)


@pytest.mark.parametrize("block", ["1", "1x4", "4x1"])
def test_layerwise_update_equals_sequential_obs(block):
    weight, _, hessian = layer_data()
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    new, kept = layerwise_prune(weight, hessian, 0.5, block, column_block=4, keep=keep)
    assert kept is keep
    torch.testing.assert_close(new.double(), sequential_obs(weight, hessian, keep), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", ["1", "1x4", "4x1"])
def test_layerwise_mask_selection_and_error(block):
    weight, x, hessian = layer_data()
    new, keep = layerwise_prune(weight, hessian, 0.5, block, column_block=16)
    assert float((~keep).float().mean()) == 0.5 and torch.equal(new == 0, ~keep)
    groups = flatten_blocks(keep, block).view(-1, obs_math.group_size(block))
    assert (groups.all(1) | ~groups.any(1)).all()  # whole groups go
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    saliency = flatten_blocks(weight.double() ** 2 / factor.diagonal() ** 2, block).view(groups.shape).sum(1)
    assert torch.equal(~groups.any(1), ~select_keep(saliency.float(), 0.5))  # one chunk: scored on the input
    masked, _ = layerwise_prune(weight, hessian, 0.5, block, update=False, keep=keep)
    error = lambda w: float(((w - weight) @ x.T).norm())  # noqa: E731
    assert error(new) < 0.9 * error(masked)
