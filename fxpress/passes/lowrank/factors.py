"""The factorization itself: W (out, in) ~ U (out, r) @ V (r, in), plain or activation-aware.

- ``svd``: truncated SVD of W, the best rank-r approximation in ||W - W'||_F.
- ``asvd``: whitened SVD.  With the input covariance C = X^T X / n = S S^T,
  ||(W - W') X^T||_F^2 = n ||(W - W') S||_F^2, so truncating the SVD of W S and
  multiplying back by S^-1 gives the rank-r W' with the least output error on
  the calibration inputs (SVD-LLM's whitening; ASVD's diagonal scaling is the
  special case of a diagonal C).  S comes from the eigendecomposition of C,
  damped by `damp` times its mean diagonal so that unseen directions keep a
  small weight and S stays invertible.

Singular values are split evenly between the two factors (U sqrt(s), sqrt(s) V),
which keeps both on one scale when `distill` trains them afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Whitening:
    """S and S^-1 with S S^T = C + damp * mean(diag C) I (float64)."""

    root: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def from_xtx(cls, xtx: torch.Tensor, rows: int, damp: float) -> Whitening:
        covariance = xtx.double() / max(rows, 1)
        level = max(damp * float(covariance.diagonal().mean()), 1e-12)
        covariance = covariance + level * torch.eye(covariance.shape[0], dtype=torch.float64)
        values, vectors = torch.linalg.eigh(covariance)
        values = values.clamp_min(level)
        return cls(vectors * values.sqrt(), (vectors / values.sqrt()).t())


@dataclass(frozen=True)
class Spectrum:
    """The SVD of W (or of W S) that every rank of one layer is cut from."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    unwhiten: torch.Tensor | None  # S^-1 (asvd), applied to the right factor

    @classmethod
    def of(cls, weight: torch.Tensor, whitening: Whitening | None = None) -> Spectrum:
        matrix = weight.double()
        if whitening is not None:
            matrix = matrix @ whitening.root
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return cls(u, s, vh, None if whitening is None else whitening.inverse)

    @property
    def max_rank(self) -> int:
        return int(self.s.numel())

    def rank_for_energy(self, energy: float) -> int:
        """The smallest r whose leading singular values keep `energy` of sum(s^2)."""
        power = self.s ** 2
        total = float(power.sum())
        if total == 0.0:
            return 1
        kept = torch.cumsum(power, 0) / total
        return min(int((kept < energy - 1e-12).sum()) + 1, self.max_rank)

    def energy_kept(self, rank: int) -> float:
        power = self.s ** 2
        total = float(power.sum())
        return 1.0 if total == 0.0 else float(power[:rank].sum()) / total

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (out, rank), V (rank, in)) with U @ V the rank-`rank` approximation of W."""
        root = self.s[:rank].sqrt()
        left = self.u[:, :rank] * root
        right = root[:, None] * self.vh[:rank]
        if self.unwhiten is not None:
            right = right @ self.unwhiten
        return left.to(dtype).contiguous(), right.to(dtype).contiguous()


def output_error(weight: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor) -> float:
    """||(W - W') X^T|| / ||W X^T|| on the inputs whose X^T X is `xtx`."""
    diff = (weight.double() - approx.double())
    err = float(torch.einsum("oi,ij,oj->", diff, xtx.double(), diff))
    ref = float(torch.einsum("oi,ij,oj->", weight.double(), xtx.double(), weight.double()))
    return (max(err, 0.0) / ref) ** 0.5 if ref > 0 else 0.0
