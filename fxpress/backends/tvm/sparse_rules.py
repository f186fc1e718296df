"""TVM lowering rule for ``fxpress::sparse_linear`` (see :mod:`fxpress.ops.sparse`).

TVM 0.27 has no sparse ops, so the rule emits the C kernel's loop nest as TIR, token-minor:

    xt (K, M)  = permute_dims(x reshaped to (M, K))                    (a Relax transpose)
    yt[R*i + r, m] = bias[R*i + r] + sum_{p in row_ptr[i] .. row_ptr[i+1]} values[p, r] * xt[col_index[p], m]
    y (..., N) = permute_dims(yt)[:, :N] reshaped                      (a Relax transpose)

The reduction runs over data-dependent bounds read from ``row_ptr``, so no schedule rule can touch
it: the function is written already scheduled (``tirx.is_scheduled``, opaque to fusion).  Tokens
are tiled by ``TOKEN_TILE`` (one vectorized loop: 16 floats is one AVX-512 vector, two AVX2 ones);
a tile accumulates R x TOKEN_TILE values in a stack array, unrolled over the R rows of a block, so
each loaded token vector serves R output rows.  The last partial tile runs the same loop, scalar.
The token count may be symbolic (a dynamic batch); K, N and the stored sizes are static.  Block
rows are computed up to a multiple of R (the padded rows hold zeros) and cut to N afterwards.
"""
from __future__ import annotations

import math

import numpy as np
import torch.fx

from fxpress.backends.tvm.rules import OPAQUE, RuleContext, register_lowering, relax_shape, rows_as_one_var, static_int
from fxpress.errors import LoweringError

TOKEN_TILE = 16  # tokens per vectorized tile


def sparse_kernel(k: int, rows: int, nnz: int, block_rows: int, tile: int = TOKEN_TILE):
    """The TIR function (xt (K, M), values (nnz, R), col_index, row_ptr, bias (rows,)) -> yt (rows, M),
    rows a multiple of R; M symbolic."""
    from tvm.script import tirx as T

    blocks = rows // block_rows

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(xt_h: T.handle, values_h: T.handle, col_h: T.handle, ptr_h: T.handle, bias_h: T.handle,
               yt_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        xt = T.match_buffer(xt_h, (k, m), "float32")
        values = T.match_buffer(values_h, (nnz, block_rows), "float32")
        col = T.match_buffer(col_h, (nnz,), "int32")
        ptr = T.match_buffer(ptr_h, (blocks + 1,), "int32")
        bias = T.match_buffer(bias_h, (rows,), "float32")
        yt = T.match_buffer(yt_h, (rows, m), "float32")
        for i in T.serial(blocks):
            for t in T.serial(m // tile):
                acc = T.decl_buffer((block_rows, tile), "float32", scope="local")
                for r in T.unroll(block_rows):
                    for j in T.vectorized(tile):
                        acc[r, j] = bias[i * block_rows + r]
                for p in T.serial(T.Cast("int64", ptr[i + 1]) - T.Cast("int64", ptr[i])):
                    q = T.Cast("int64", ptr[i]) + p
                    c = T.Cast("int64", col[q])
                    for r in T.unroll(block_rows):
                        for j in T.vectorized(tile):
                            acc[r, j] = acc[r, j] + values[q, r] * xt[c, t * tile + j]
                for r in T.unroll(block_rows):
                    for j in T.vectorized(tile):
                        yt[i * block_rows + r, t * tile + j] = acc[r, j]
            for j in T.serial(m % tile):
                mm = m // tile * tile + j
                for r in T.serial(block_rows):
                    yt[i * block_rows + r, mm] = bias[i * block_rows + r]
                for p in T.serial(T.Cast("int64", ptr[i + 1]) - T.Cast("int64", ptr[i])):
                    q = T.Cast("int64", ptr[i]) + p
                    for r in T.serial(block_rows):
                        yt[i * block_rows + r, mm] = (yt[i * block_rows + r, mm]
                                                      + values[q, r] * xt[T.Cast("int64", col[q]), mm])

    return kernel


def _static(node: torch.fx.Node, value, what: str) -> int:
    return static_int(node, value, what, "only the token count may be dynamic")


@register_lowering("fxpress::sparse_linear")
def lower_sparse_linear(ctx: RuleContext, node: torch.fx.Node):
    """x @ W.T + bias, W compressed -> transpose, the token-minor TIR SpMM, transpose back."""
    from tvm import relax

    x, values, col_index, row_ptr, bias, out_features = ctx.args(node)[:6]
    *lead, k = relax_shape(x)
    k = _static(node, k, "in_features")
    nnz, block_rows = (_static(node, v, "stored values") for v in relax_shape(values))
    out_features = int(out_features)
    blocks = math.ceil(out_features / block_rows)
    rows = blocks * block_rows
    if _static(node, relax_shape(row_ptr)[0], "row_ptr length") != blocks + 1 or str(x.ty.dtype) != "float32":
        raise LoweringError(f"fxpress::sparse_linear at node {node.format_node()}: float32 x and a row_ptr of "
                            f"{blocks + 1} entries expected (out_features={out_features}, R={block_rows})")
    tokens = math.prod(lead) if lead else 1
    padded = tokens
    if isinstance(tokens, int) or hasattr(tokens, "value"):  # static: pad to whole tiles (no scalar tail)
        x2 = ctx.bb.emit(relax.op.reshape(x, [tokens, k]))
        tokens = int(tokens)
        padded = math.ceil(tokens / TOKEN_TILE) * TOKEN_TILE
        if padded != tokens:
            x2 = ctx.bb.emit(relax.op.concat([x2, relax.const(np.zeros((padded - tokens, k), "float32"))]))
    else:  # symbolic: one variable the kernel binds; the last partial tile runs scalar
        x2 = rows_as_one_var(ctx.bb, x, [tokens, k], "tokens")
        padded = relax_shape(x2)[0]
    xt = ctx.bb.emit(relax.op.permute_dims(x2, [1, 0]))
    bias_rows = _bias_rows(ctx, bias, out_features, rows)
    func = sparse_kernel(k, rows, nnz, block_rows)
    gv = ctx.bb.add_func(func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE),
                         "fxpress_sparse_linear")
    yt = ctx.bb.emit(relax.call_tir(gv, [xt, values, col_index, row_ptr, bias_rows],
                                    relax.TensorType([rows, padded], "float32")))
    y = ctx.bb.emit(relax.op.permute_dims(yt, [1, 0]))
    if isinstance(padded, int) and padded != tokens:
        y = ctx.bb.emit(relax.op.strided_slice(y, axes=[0], begin=[0], end=[tokens]))
    if rows != out_features:
        y = ctx.bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[out_features]))
    return ctx.bb.emit(relax.op.reshape(y, [*lead, out_features]))


def _bias_rows(ctx: RuleContext, bias, out_features: int, rows: int):
    """The bias over all computed rows: zeros where there is none, and for the padded rows."""
    from tvm import relax

    if bias is None:
        return relax.const(np.zeros(rows, "float32"))
    if rows == out_features:
        return bias
    return ctx.bb.emit(relax.op.concat([bias, relax.const(np.zeros(rows - out_features, "float32"))]))
