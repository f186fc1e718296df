"""The tensor math of Optimal Brain Surgeon pruning (oBERT, SparseGPT); no graphs here.

Fisher form (oBERT, Kurtic et al. 2022).  The loss curvature of a layer is
the dampened empirical Fisher ``F = lam I + (1/m) sum_k g_k g_k^T`` over m
gradients, kept block-diagonal with B x B blocks of consecutive weights in
a *pruning order* (`flatten_blocks`):

- block ``"1"``: single weights, row-major order;
- block ``"1x4"``: 1 output row x 4 consecutive input columns, row-major, so
  a group is 4 consecutive entries;
- block ``"4x1"``: 4 consecutive output rows x 1 input column, column-major,
  so again a group is 4 consecutive entries.

With B a multiple of the group size q, each group lies inside one Fisher
block.  Scores: ``rho = w^2 / (2 [F^-1]_ii)`` for single weights and
``rho = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q`` for a group Q; the OBS update of the
remaining weights after removing Q is ``dw = -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q``,
summed over the removed groups of a Fisher block (as oBERT does) and
followed by zeroing the removed weights.  ``lam`` is relative by default:
``damp * mean(g^2)`` of the layer (`FisherSums.inverse`).

Layer-wise form (SparseGPT, Frantar & Alistarh 2023), for models whose
block Fisher does not fit in memory: no gradients, the Hessian of the layer's
reconstruction error ``H = 2 X^T X / n + damp * mean(diag H) I`` from its
recorded inputs X, shared by every output row; columns are pruned left to
right in chunks, each pruned weight's error spread over the columns not yet
visited through the Cholesky factor of ``H^-1`` (`layerwise_prune`).
"""
from __future__ import annotations

import math

import torch

GROUP_SIZES = {"1": 1, "1x4": 4, "4x1": 4}
CHUNK_ELEMENTS = 1 << 22  # entries of B x B blocks handled at once (memory of one chunk ~ 32 MiB in f64)
GRADIENT_BUFFER = 8  # gradients FisherSums adds at once


# -- pruning order ----------------------------------------------------------------------
def group_size(block: str) -> int:
    """Weights per pruning group: 1 for "1", 4 for "1x4" and "4x1"."""
    if block not in GROUP_SIZES:
        raise ValueError(f"unknown block shape {block!r}; choose one of {', '.join(GROUP_SIZES)}")
    return GROUP_SIZES[block]


def block_mismatch(shape: tuple[int, ...], block: str) -> str | None:
    """Why pruning groups of shape `block` do not tile a (out, in) weight, or None when they do."""
    out_features, in_features = shape
    if block == "1x4" and in_features % 4:
        return f"block=1x4 groups 4 input columns, but the layer has {in_features} inputs (not a multiple of 4)"
    if block == "4x1" and out_features % 4:
        return f"block=4x1 groups 4 output rows, but the layer has {out_features} outputs (not a multiple of 4)"
    return None


def flatten_blocks(weight: torch.Tensor, block: str) -> torch.Tensor:
    """A (out, in) tensor as a vector in pruning order: every group is consecutive entries."""
    return (weight.t() if block == "4x1" else weight).reshape(-1)


def unflatten_blocks(flat: torch.Tensor, shape: tuple[int, ...], block: str) -> torch.Tensor:
    """Inverse of `flatten_blocks`."""
    out_features, in_features = shape
    if block == "4x1":
        return flat.reshape(in_features, out_features).t().contiguous()
    return flat.reshape(out_features, in_features)


# -- the block-diagonal Fisher and its inverse ------------------------------------------
def _chunks(blocks: int, fisher_block: int) -> list[tuple[int, int]]:
    """(start, stop) ranges of blocks, each holding at most CHUNK_ELEMENTS entries."""
    step = max(1, CHUNK_ELEMENTS // (fisher_block * fisher_block))
    return [(start, min(start + step, blocks)) for start in range(0, blocks, step)]


class FisherSums:
    """Running sums of one layer's gradients: sum_k g_k g_k^T per B-block (or only sum g^2 when not `full`).

    Memory is n * B floats for n weights, whatever the number of gradients, plus a buffer of `buffer`
    gradients: they are added as one rank-`buffer` update per block (tens of times faster than rank 1).
    """

    def __init__(self, numel: int, fisher_block: int, full: bool = True, buffer: int = GRADIENT_BUFFER):
        if numel % fisher_block:
            raise ValueError(f"fisher_block={fisher_block} does not divide {numel} weights")
        self.fisher_block, self.count = fisher_block, 0
        blocks = numel // fisher_block
        self.outer = torch.zeros(blocks, fisher_block, fisher_block) if full else None
        self.squares = torch.zeros(numel)
        self._pending = torch.zeros(blocks, fisher_block, buffer) if full else None
        self._filled = 0

    def add(self, grad: torch.Tensor) -> None:
        """Add one gradient, a vector in pruning order."""
        g = grad.detach().reshape(-1).float()
        self.squares.add_(g * g)
        self.count += 1
        if self._pending is not None:
            self._pending[:, :, self._filled] = g.view(-1, self.fisher_block)
            self._filled += 1
            if self._filled == self._pending.shape[2]:
                self.flush()

    def flush(self) -> None:
        """Add the buffered gradients to the block sums."""
        if self._pending is not None and self._filled:
            rows = self._pending[:, :, :self._filled]
            self.outer.baddbmm_(rows, rows.transpose(1, 2))
            self._filled = 0

    def mean_squares(self) -> torch.Tensor:
        """Per-weight mean g^2 (the diagonal of the empirical Fisher)."""
        return self.squares / max(self.count, 1)

    def damping(self, damp: float) -> float:
        """lam = damp * mean g^2 of the layer (a floor keeps F invertible when every gradient is zero)."""
        return max(damp * float(self.squares.mean()) / max(self.count, 1), 1e-30)

    def inverse(self, damp: float) -> torch.Tensor:
        """Blocks of F^-1, F = lam I + outer / m with lam = `damping(damp)`: (n / B, B, B), float32."""
        return self.inverse_with(self.damping(damp))

    def inverse_with(self, lam: float) -> torch.Tensor:
        """Blocks of F^-1 for an absolute lam."""
        if self.outer is None:
            raise ValueError("these sums keep only the diagonal (full=False)")
        self.flush()
        return inverse_from_sums(self.outer, self.count, lam)


def inverse_from_sums(outer: torch.Tensor, count: int, lam: float) -> torch.Tensor:
    """(lam I + outer / count)^-1 per block by Cholesky, in float64 chunks (the batched closed form)."""
    blocks, size, _ = outer.shape
    result = torch.empty_like(outer, dtype=torch.float32)
    eye = torch.eye(size, dtype=torch.float64)
    for start, stop in _chunks(blocks, size):
        fisher = outer[start:stop].double() / max(count, 1) + lam * eye
        result[start:stop] = torch.cholesky_inverse(torch.linalg.cholesky(fisher)).float()
    return result


def inverse_fisher(grads: torch.Tensor, fisher_block: int, lam: float) -> torch.Tensor:
    """Blocks of (lam I + G^T G / m)^-1 for an (m, n) gradient matrix G, by the closed form."""
    sums = FisherSums(grads.shape[1], fisher_block)
    for grad in grads:
        sums.add(grad)
    return sums.inverse_with(lam)


def woodbury_inverse(grads: torch.Tensor, fisher_block: int, lam: float) -> torch.Tensor:
    """The same blocks by m rank-1 Woodbury updates from lam^-1 I, vectorized over blocks, in chunks:
    (A + g g^T / m)^-1 = A^-1 - A^-1 g g^T A^-1 / (m + g^T A^-1 g)."""
    count, numel = grads.shape
    blocks = numel // fisher_block
    if blocks * fisher_block != numel:
        raise ValueError(f"fisher_block={fisher_block} does not divide {numel} weights")
    result = torch.empty(blocks, fisher_block, fisher_block)
    rows = grads.double().reshape(count, blocks, fisher_block)
    for start, stop in _chunks(blocks, fisher_block):
        inverse = torch.eye(fisher_block, dtype=torch.float64).repeat(stop - start, 1, 1) / lam
        for g in rows[:, start:stop]:
            projected = torch.bmm(inverse, g.unsqueeze(2))  # A^-1 g, (c, B, 1)
            denominator = count + torch.bmm(g.unsqueeze(1), projected)  # (c, 1, 1)
            inverse -= torch.bmm(projected, projected.transpose(1, 2)) / denominator
        result[start:stop] = inverse.float()
    return result


# -- scores, masks and the OBS update ----------------------------------------------------
def _group_inverses(finv: torch.Tensor, q: int) -> torch.Tensor:
    """([F^-1]_QQ)^-1 for every group: (n / q, q, q)."""
    blocks, size, _ = finv.shape
    per = size // q
    diagonal = finv.double().view(blocks, per, q, per, q).diagonal(dim1=1, dim2=3)  # (blocks, q, q, per)
    return torch.linalg.inv(diagonal.permute(0, 3, 1, 2).reshape(-1, q, q))


def obs_scores(weight: torch.Tensor, finv: torch.Tensor, q: int) -> torch.Tensor:
    """Saliency of every group of q consecutive weights (pruning order): 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q."""
    w = weight.reshape(-1).double()
    if q == 1:
        return (w * w / (2 * finv.diagonal(dim1=1, dim2=2).reshape(-1).double())).float()
    groups = w.view(-1, q, 1)
    return (0.5 * (groups.transpose(1, 2) @ _group_inverses(finv, q) @ groups).reshape(-1)).float()


def diagonal_fisher_scores(weight: torch.Tensor, mean_squares: torch.Tensor, q: int,
                           lam: float = 0.0) -> torch.Tensor:
    """The diagonal-Fisher baseline: sum over a group of w^2 * (lam + mean g^2), the OBS score of the
    dampened Fisher's diagonal (without lam, weights whose few gradients were zero go whatever their size)."""
    return (weight.reshape(-1) ** 2 * (lam + mean_squares.reshape(-1))).view(-1, q).sum(1)


def magnitude_scores(weight: torch.Tensor, q: int) -> torch.Tensor:
    """Magnitude pruning: sum over a group of w^2."""
    return (weight.reshape(-1) ** 2).view(-1, q).sum(1)


def select_keep(scores: torch.Tensor, sparsity: float, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask over groups: the round(sparsity * groups) lowest scores go; groups in `pruned` go first."""
    scores = scores.clone()
    if pruned is not None:
        scores[pruned] = -math.inf
    count = int(round(sparsity * scores.numel()))
    if pruned is not None:
        count = max(count, int(pruned.sum()))
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:count]] = False
    return keep


def expand_groups(keep: torch.Tensor, q: int) -> torch.Tensor:
    """A keep mask over groups -> over weights (pruning order)."""
    return keep.repeat_interleave(q)


def obs_update(weight: torch.Tensor, finv: torch.Tensor, keep: torch.Tensor, q: int) -> torch.Tensor:
    """w + sum over removed groups Q of -F^-1[:, Q] ([F^-1]_QQ)^-1 w_Q, removed weights set to 0 (pruning order)."""
    blocks, size, _ = finv.shape
    w = weight.reshape(-1).double()
    removed = ~keep.reshape(-1)
    if q == 1:
        scaled = torch.where(removed, w / finv.diagonal(dim1=1, dim2=2).reshape(-1).double(), 0.0)
    else:
        groups = torch.where(removed, w, 0.0).view(-1, q, 1)
        scaled = (_group_inverses(finv, q) @ groups).reshape(-1)
    delta = -torch.bmm(finv.double(), scaled.view(blocks, size, 1)).reshape(-1)
    return ((w + delta) * keep.reshape(-1)).to(weight.dtype)


# -- layer-wise (SparseGPT) form ----------------------------------------------------------
class HessianSums:
    """Running X^T X and row count of a layer's inputs (..., in)."""

    def __init__(self, features: int):
        self.xtx = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
        self.xtx.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def hessian(self, damp: float) -> torch.Tensor:
        return layer_hessian(self.xtx, self.rows, damp)


def layer_hessian(xtx: torch.Tensor, rows: int, damp: float) -> torch.Tensor:
    """H = 2 X^T X / n + damp * mean(diag) I (float64)."""
    h = 2 * xtx.double() / max(rows, 1)
    level = max(damp * float(h.diagonal().mean()), 1e-12)
    return h + level * torch.eye(h.shape[0], dtype=torch.float64)


def _column_scores(w: torch.Tensor, d: torch.Tensor, block: str) -> torch.Tensor:
    """Saliency w^2 / d^2 of a (out, c) chunk, summed per group: (groups,) in the chunk's pruning order."""
    scores = w * w / (d * d).unsqueeze(0)
    return flatten_blocks(scores, block).view(-1, group_size(block)).sum(1)


def _chunk_keep(w: torch.Tensor, d: torch.Tensor, sparsity: float, block: str,
                pruned: torch.Tensor | None) -> torch.Tensor:
    q = group_size(block)
    groups_pruned = None if pruned is None else flatten_blocks(pruned, block).view(-1, q).any(1)
    keep = expand_groups(select_keep(_column_scores(w, d, block), sparsity, groups_pruned), q)
    return unflatten_blocks(keep, tuple(w.shape), block)


def layerwise_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, block: str = "1", *,
                    update: bool = True, column_block: int = 128, keep: torch.Tensor | None = None,
                    pruned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a (out, in) weight against the layer-wise Hessian; return (new weight, keep mask).

    With `update`, SparseGPT: columns left to right in chunks of `column_block`, the mask of a chunk
    chosen on its current weights by w^2 / [U]_jj^2 (U the upper Cholesky factor of H^-1, so U_jj^2 is
    the inverse Hessian of the columns not yet visited), each removed weight's error spread over the
    later columns.  Without, a single OBS score w^2 / [H^-1]_jj and no update.  `keep` fixes the mask;
    `pruned` (True = already pruned) forces groups out.
    """
    w = weight.detach().double().clone()
    q = group_size(block)
    if block == "1x4" and column_block % 4:
        raise ValueError(f"column_block={column_block} must be a multiple of 4 for block=1x4")
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(hessian.double()))
    if not update:
        if keep is None:
            keep = _chunk_keep(w, hinv.diagonal().sqrt(), sparsity, block, pruned)
        return (w * keep).to(weight.dtype), keep
    factor = torch.linalg.cholesky(hinv, upper=True)
    masks = []
    for start in range(0, w.shape[1], column_block):
        stop = min(start + column_block, w.shape[1])
        chunk, u = w[:, start:stop].clone(), factor[start:stop, start:stop]
        d = u.diagonal()
        chunk_keep = keep[:, start:stop] if keep is not None else _chunk_keep(
            chunk, d, sparsity, block, None if pruned is None else pruned[:, start:stop])
        errors = torch.zeros_like(chunk)
        for j in range(stop - start):
            error = chunk[:, j] * (~chunk_keep[:, j]) / d[j]
            chunk[:, j:] -= error.unsqueeze(1) * u[j, j:].unsqueeze(0)
            errors[:, j] = error
        w[:, start:stop] = chunk
        w[:, stop:] -= errors @ factor[start:stop, stop:]
        masks.append(chunk_keep)
    keep = torch.cat(masks, 1) if keep is None else keep
    return (w * keep).to(weight.dtype), keep
