"""GPTQ (Frantar et al., 2023): quantize a weight column by column, spreading each column's error over the
columns not yet quantized so that the layer's output error on calibration inputs stays small.

With H = 2 X^T X / n + damp * mean(diag H) I (X: the layer's recorded inputs) and U the upper Cholesky
factor of H^-1, column k is quantized to q_k and the error (w_k - q_k) / U_kk updates the later columns
by its product with row k of U.  Updates inside a block of columns are applied at once, lazily, to the
columns after the block (the paper's lazy batch update).  The group's scale and zero are chosen from
the group's (already updated) columns when its first column is reached; blocks are a whole number of
groups, so a group never straddles a block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fxpress.ops.quant import QuantizedWeight, encode, decode, group_params, pack_weight, padded_width

BLOCK_COLUMNS = 128  # columns per lazy batch update (rounded to whole groups)


def inverse_cholesky(hessian: Tensor) -> Tensor:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), in float64."""
    lower = torch.linalg.cholesky(hessian.double())
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_quantize(weight: Tensor, hessian: Tensor, bits: int, group: int, form: str,
                  pad: bool = False) -> QuantizedWeight:
    """GPTQ of a (N, K) weight given the damped (K, K) Hessian of its layer's output error."""
    rows, features = weight.shape
    padded = padded_width(features, group, pad)
    w = F.pad(weight.detach().double(), (0, padded - features))
    h = torch.eye(padded, dtype=torch.float64)
    h[:features, :features] = hessian.double()  # padding columns: unit diagonal, coupled to nothing
    upper = inverse_cholesky(h)
    q = torch.zeros(rows, padded, dtype=torch.float64)
    groups = padded // group
    scales = torch.zeros(rows, groups, dtype=torch.float64)
    zeros = None if form == "sym" else torch.zeros(rows, groups, dtype=torch.float64)
    block = max(group, BLOCK_COLUMNS // group * group)
    for start in range(0, padded, block):
        end = min(start + block, padded)
        chunk, errors = w[:, start:end].clone(), torch.zeros(rows, end - start, dtype=torch.float64)
        inv = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group == 0:
                g = column // group
                scale, zero = group_params(chunk[:, i:i + group], bits, form)
                scales[:, g] = scale.double()
                if zeros is not None:
                    zeros[:, g] = zero.double()
            g = column // group
            zero = None if zeros is None else zeros[:, g]
            codes = encode(chunk[:, i], scales[:, g], zero, bits, form)
            q[:, column] = codes
            error = (chunk[:, i] - decode(codes, scales[:, g], zero, bits, form)) / inv[i, i]
            chunk[:, i:] -= error.unsqueeze(1) * inv[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return pack_weight(q, scales, zeros, bits, group, features, form)
