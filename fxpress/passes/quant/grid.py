"""Per-group quantization grids that are searched and then learned, for quantized-distill's ``grid=learned``.

A min-max grid (RTN's: each group's scale spans its whole range) wastes most of its levels on a few
large values at 2 bits: on SmolLM2, RTN int2 g32 multiplies perplexity by about a thousand.

- `searched_grid`: each group's range [a * low, b * high] (sym: a * max |w|) is clipped by the factors
  a, b in `SHRINKS` that minimise the group's error weighted by the mean square of each input feature,
  sum_k E[x_k^2] (w_k - Q(w)_k)^2: the diagonal of the output-error proxy ||(W - Q(W)) X||^2.
- `GroupGrid`: that grid's scales (and zeros) as trainable tensors.  `GroupGrid.quantize(w)` is Q(w),
  differentiable in w by the straight-through estimator and in the scale and zero as learned step size
  quantization (LSQ) has it: Q(w) = s * (clamp(round(w / s) + z, 0, 2^bits - 1) - z), rounding passed
  straight through.  Integer zero points are rounded in the forward (straight through as well), so the
  trained forward is exactly the packed weight's decode.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fxpress.ops.quant import QuantizedWeight, decode, encode, group_params, pack_weight

SHRINKS = torch.linspace(0.3, 1.0, 15)  # clipping factors of a group's low and high ends
_TINY = 1e-8


def grouped(weight: Tensor, group: int) -> tuple[Tensor, int]:
    """(N, K) -> (N, Kp / group, group), zero-padded to Kp (a multiple of group), and Kp."""
    rows, features = weight.shape
    padded = math.ceil(features / group) * group
    return F.pad(weight, (0, padded - features)).view(rows, padded // group, group), padded


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, the identity backward."""
    return x + (torch.round(x) - x).detach()


def searched_grid(weight: Tensor, bits: int, group: int, form: str,
                  importance: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(scale, zero) per group of a (N, K) weight, (N, Kp / group) each: the clipped range with the least
    importance-weighted error (importance: (K,) mean square of each input feature; None weighs all alike).
    The unclipped range (a = b = 1) is a candidate, so the result is never worse than RTN's grid."""
    with torch.no_grad():
        rows, features = weight.shape
        w, padded = grouped(weight.float(), group)
        weigh = torch.ones(padded) if importance is None else F.pad(importance.float(), (0, padded - features))
        weigh = weigh.view(1, padded // group, group)
        low, high, extent = w.amin(-1, True), w.amax(-1, True), w.abs().amax(-1, True)
        pairs = [(a, a) for a in SHRINKS] if form == "sym" else [(a, b) for a in SHRINKS for b in SHRINKS]
        best_error = best_scale = best_zero = None
        for a, b in pairs:
            lower, upper = (-extent * a, extent * a) if form == "sym" else (low * a, high * b)
            scale, zero = group_params(torch.minimum(torch.maximum(w, lower), upper), bits, form)
            wide_zero = None if zero is None else zero.unsqueeze(-1)
            approx = decode(encode(w, scale.unsqueeze(-1), wide_zero, bits, form), scale.unsqueeze(-1), wide_zero,
                            bits, form)
            error = ((approx - w) ** 2 * weigh).sum(-1)
            if best_error is None:
                best_error, best_scale, best_zero = error, scale, zero
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = None if zero is None else torch.where(better, zero, best_zero)
        return best_scale, best_zero


class GroupGrid:
    """Trainable per-group scales (and zeros) of one (N, K) weight."""

    def __init__(self, weight: Tensor, bits: int, group: int, form: str, importance: Tensor | None = None):
        self.rows, self.features = weight.shape
        self.bits, self.group, self.form = bits, group, form
        scale, zero = searched_grid(weight, bits, group, form, importance)
        self.scale = torch.nn.Parameter(scale.clone(), requires_grad=True)
        self.zero = None if zero is None else torch.nn.Parameter(zero.float().clone(), requires_grad=True)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.scale] if self.zero is None else [self.scale, self.zero]

    def _scale_zero(self) -> tuple[Tensor, Tensor | None]:
        """The grid as the forward and the packed weight use it: scales > 0, integer zeros in range."""
        scale = self.scale.clamp_min(_TINY).unsqueeze(-1)
        if self.zero is None:
            return scale, None
        if self.form == "int":
            return scale, round_ste(self.zero.clamp(0, 2 ** self.bits - 1)).unsqueeze(-1)
        return scale, self.zero.unsqueeze(-1)

    def _codes(self, w: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
        maxq = 2 ** self.bits - 1
        if self.form == "float":
            return torch.clamp(round_ste((w - zero) / scale), 0, maxq)
        offset = zero if self.form == "int" else 2 ** (self.bits - 1)
        return torch.clamp(round_ste(w / scale) + offset, 0, maxq)

    def quantize(self, weight: Tensor) -> Tensor:
        """Q(weight) (N, K) on this grid, differentiable in the weight (STE), the scales and the zeros."""
        w, padded = grouped(weight, self.group)
        scale, zero = self._scale_zero()
        values = decode(self._codes(w, scale, zero), scale, zero, self.bits, self.form)
        return values.reshape(self.rows, padded)[:, : self.features]

    def packed(self, weight: Tensor) -> QuantizedWeight:
        """The packed form of Q(weight): its decode equals `quantize(weight)`."""
        with torch.no_grad():
            w, padded = grouped(weight.float(), self.group)
            scale, zero = self._scale_zero()
            codes = self._codes(w, scale, zero).reshape(self.rows, padded)
            return pack_weight(codes, scale.squeeze(-1), None if zero is None else zero.squeeze(-1), self.bits,
                               self.group, self.features, self.form)
