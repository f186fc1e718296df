"""Comparing model outputs: exact for preserving passes, measured for lossy ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree


@dataclass(frozen=True)
class OutputError:
    """How far one set of outputs is from a reference."""

    max_abs: float
    cosine: float  # over all floating outputs flattened; 1.0 is identical direction
    mismatched_shapes: bool = False

    def within(self, atol: float) -> bool:
        return not self.mismatched_shapes and self.max_abs <= atol


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    leaves, _ = pytree.tree_flatten(outputs)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def compare_outputs(reference: Any, candidate: Any) -> OutputError:
    """Max absolute error and cosine similarity between two output pytrees."""
    ref = [t.detach() for t in output_tensors(reference)]
    cand = [t.detach() for t in output_tensors(candidate)]
    if len(ref) != len(cand) or any(r.shape != c.shape for r, c in zip(ref, cand)):
        return OutputError(max_abs=float("inf"), cosine=0.0, mismatched_shapes=True)
    max_abs = 0.0
    ref_flat, cand_flat = [], []
    for r, c in zip(ref, cand):
        if r.numel() == 0:
            continue
        diff = (r.double() - c.double()).abs()
        max_abs = max(max_abs, float(diff.max()))
        if r.is_floating_point():
            ref_flat.append(r.double().flatten())
            cand_flat.append(c.double().flatten())
    cosine = 1.0
    if ref_flat:
        a, b = torch.cat(ref_flat), torch.cat(cand_flat)
        denom = a.norm() * b.norm()
        cosine = float((a @ b) / denom) if denom > 0 else float(torch.equal(a, b))
    return OutputError(max_abs=max_abs, cosine=cosine)


def tolerance_for(outputs: Any, rtol: float = 1e-5, atol: float = 1e-5) -> float:
    """An absolute tolerance scaled to the size of the reference outputs."""
    scale = max((float(t.abs().max()) for t in output_tensors(outputs) if t.numel()), default=0.0)
    return atol + rtol * scale
