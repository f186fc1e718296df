"""Sparse-weight linear layer: `fxpress::sparse_linear`, its compressed weight layout and facts.

    sparse_linear(x, values, col_index, row_ptr, bias, out_features) -> y = x @ W.T + bias

W (out_features, in_features = x.shape[-1]) is stored by rows of blocks of R = values.shape[1]
consecutive rows (R = 4: 4x1 blocks; R = 1: plain CSR):

    values     float (nnz, R)   block p holds W[R*i + r, col_index[p]] = values[p, r], r = 0..R-1
    col_index  int32 (nnz,)     the input column of each block, ascending within a block row
    row_ptr    int32 (ceil(out_features / R) + 1,)   blocks of block row i: row_ptr[i] .. row_ptr[i+1]

Rows past out_features in the last block row hold zeros.  A 4x1 block is kept when any of its 4
weights is non-zero, so a 4x1-block-sparse weight (what structured pruning leaves) stores only its
kept weights plus one int32 per 4 of them, and the CPU kernel (`sparse_linear.c`, token-minor: the
tokens are the vector axis) reuses each loaded token vector for 4 output rows.

The reference implementation decompresses W and calls F.linear; the eager CPU path runs the C
kernel for float32 inputs outside autograd (`FUSED = False` or no C compiler: the reference).
Gradients flow to x only (the weight is frozen).  MACs: tokens x stored values (nnz * R).
Backends lower the op through their rule tables (`fxpress/backends/tvm/sparse_rules.py`); the
native backend runs it eagerly, on the C kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fxpress.ir.opinfo import OpInfo, define_op
from fxpress.ops import native_sparse
from fxpress.ops.flow_rules import linear_flow

BLOCK_ROWS = (1, 4)


# -- the compressed layout ---------------------------------------------------------------------
@dataclass(frozen=True)
class CompressedWeight:
    """A weight (out_features, in_features) in the layout of the module doc."""

    values: Tensor
    col_index: Tensor
    row_ptr: Tensor
    out_features: int
    in_features: int

    @property
    def block_rows(self) -> int:
        return int(self.values.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.col_index, self.row_ptr))

    @property
    def density(self) -> float:
        """Stored values over the dense weight's size (zeros inside kept blocks count)."""
        return self.values.numel() / max(1, self.out_features * self.in_features)

    def dense(self) -> Tensor:
        return decompress(self.values, self.col_index, self.row_ptr, self.out_features, self.in_features)


def _padded_rows(dense: Tensor, block_rows: int) -> Tensor:
    """(ceil(N / R), R, K): the weight with zero rows appended up to a multiple of R."""
    rows, cols = dense.shape
    padded = math.ceil(rows / block_rows) * block_rows
    if padded != rows:
        dense = torch.cat([dense, dense.new_zeros(padded - rows, cols)])
    return dense.view(padded // block_rows, block_rows, cols)


def block_mask(dense: Tensor, block_rows: int) -> Tensor:
    """(ceil(N / R), K) bool: which R x 1 blocks hold a non-zero weight."""
    return _padded_rows(dense.detach(), block_rows).ne(0).any(dim=1)


def compress_weight(dense: Tensor, block_rows: int = 4) -> CompressedWeight:
    """The layout of the module doc for a dense (out, in) weight: every R x 1 block with a non-zero."""
    if block_rows not in BLOCK_ROWS:
        raise ValueError(f"sparse_linear: block_rows must be one of {BLOCK_ROWS}, got {block_rows}")
    if dense.dim() != 2:
        raise ValueError(f"sparse_linear: a weight is (out, in), got shape {tuple(dense.shape)}")
    dense = dense.detach()
    blocks = _padded_rows(dense, block_rows)  # (block rows, R, K)
    kept = blocks.ne(0).any(dim=1)  # (block rows, K)
    block_row, col = kept.nonzero(as_tuple=True)  # row-major: by block row, columns ascending
    values = blocks.permute(0, 2, 1)[block_row, col].contiguous()  # (nnz, R)
    counts = kept.sum(dim=1)
    row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return CompressedWeight(values, col.to(torch.int32), row_ptr, dense.shape[0], dense.shape[1])


def decompress(values: Tensor, col_index: Tensor, row_ptr: Tensor, out_features: int, in_features: int) -> Tensor:
    """The dense (out_features, in_features) weight of a compressed one."""
    block_rows = values.shape[1]
    block_count = row_ptr.numel() - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    block_row = torch.repeat_interleave(torch.arange(block_count), counts)
    blocks = values.new_zeros(block_count, in_features, block_rows)
    blocks[block_row, col_index.to(torch.int64)] = values
    return blocks.permute(0, 2, 1).reshape(block_count * block_rows, in_features)[:out_features]


def check_layout(x: Tensor, values: Tensor, col_index: Tensor, row_ptr: Tensor, bias: Tensor | None,
                 out_features: int) -> None:
    """Shapes and dtypes fit the module doc (the data itself is trusted: `compress_weight` made it)."""
    block_rows = values.shape[1] if values.dim() == 2 else 0
    problems = []
    if block_rows not in BLOCK_ROWS:
        problems.append(f"values must be (nnz, R) with R in {BLOCK_ROWS}, got {tuple(values.shape)}")
    elif row_ptr.shape != (math.ceil(out_features / block_rows) + 1,):
        problems.append(f"row_ptr {tuple(row_ptr.shape)} does not fit out_features={out_features}, R={block_rows}")
    if col_index.shape != values.shape[:1] or col_index.dtype != torch.int32 or row_ptr.dtype != torch.int32:
        problems.append(f"col_index {col_index.dtype}{tuple(col_index.shape)} / row_ptr {row_ptr.dtype} "
                        f"must be int32, one index per block")
    if bias is not None and bias.shape != (out_features,):
        problems.append(f"bias {tuple(bias.shape)} is not ({out_features},)")
    if problems:
        raise ValueError("sparse_linear: " + "; ".join(problems))


# -- reference and eager implementations ---------------------------------------------------------
def sparse_linear_reference(x: Tensor, values: Tensor, col_index: Tensor, row_ptr: Tensor, bias: Tensor | None,
                            out_features: int) -> Tensor:
    """x @ W.T + bias with W decompressed: the op's definition."""
    weight = decompress(values, col_index, row_ptr, out_features, x.shape[-1]).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# The C kernel runs float32 CPU calls outside autograd; `FUSED = False` (or no C compiler) keeps the torch path.
FUSED = True


def _kernel_qualifies(x: Tensor, values: Tensor, bias: Tensor | None) -> bool:
    tensors = (x, values) if bias is None else (x, values, bias)
    return (FUSED and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and x.requires_grad) and native_sparse.available())


def _sparse_linear(x: Tensor, values: Tensor, col_index: Tensor, row_ptr: Tensor, bias: Tensor | None,
                   out_features: int) -> Tensor:
    check_layout(x, values, col_index, row_ptr, bias, out_features)
    if _kernel_qualifies(x, values, bias):
        return native_sparse.sparse_linear(x.detach(), values.detach(), col_index, row_ptr,
                                           None if bias is None else bias.detach(), out_features)
    with torch.no_grad():
        return sparse_linear_reference(x, values, col_index, row_ptr, bias, out_features)


def _sparse_linear_fake(x, values, col_index, row_ptr, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


# Defined with a plain torch.library fragment (not @custom_op, whose Python wrapper costs a few
# microseconds per call, and a model calls this op once per linear layer).
_LIBRARY = torch.library.Library("fxpress", "FRAGMENT")
_LIBRARY.define("sparse_linear(Tensor x, Tensor values, Tensor col_index, Tensor row_ptr, Tensor? bias, "
                "int out_features) -> Tensor")
_LIBRARY.impl("sparse_linear", _sparse_linear, "CompositeExplicitAutograd")
torch.library.register_fake("fxpress::sparse_linear", _sparse_linear_fake, lib=_LIBRARY)


def _setup(ctx, inputs, output) -> None:
    ctx.inputs = inputs


def _backward(ctx, grad):
    """d y / d x = grad @ W (the weight is frozen: no gradient for values, indices or bias)."""
    x, values, col_index, row_ptr, _bias, out_features = ctx.inputs
    weight = decompress(values.detach(), col_index, row_ptr, out_features, x.shape[-1]).to(grad.dtype)
    return grad @ weight, None, None, None, None, None


torch.library.register_autograd("fxpress::sparse_linear", _backward, setup_context=_setup, lib=_LIBRARY)

SPARSE_LINEAR = torch.ops.fxpress.sparse_linear.default  # x @ W.T + bias, W compressed (see the module doc)


def sparse_linear_macs(node: Any, arg_shapes: list, out: Any) -> int:
    """Output rows x stored values (nnz blocks x R): the multiply-adds the kernel does."""
    values = arg_shapes[1]
    if not values or not out:
        return 0
    return math.prod(out[:-1]) * math.prod(values)


define_op(OpInfo(SPARSE_LINEAR, "matmul", sparse_linear_macs, linear_flow, doc="x @ W.T + bias, W compressed"))
