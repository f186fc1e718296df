"""Which slices of an op's inputs and output must be removed together: the coupling rules of the dialect.

The tracker (`fxpress.analysis.dimension_flow`) keeps, for every tensor it
has reached, a *mask*: a bool tensor of the tensor's rank, each axis either
full size or 1 (1 = the same along that axis), True where an element is
removed.  A rule sees a `CouplingContext` and couples both ways: from any
input's mask to the output's, and from the output's back to the inputs',
calling `ctx.couple(tensor, mask)`.  Masks only grow; the tracker runs a
rule again whenever one of its tensors' masks grew, until nothing changes.

Copies are removed only when every copy goes: backward through a broadcast
or an `expand` an input element is removed when all outputs it feeds are
(so a grouped-query `repeat_kv` keeps a KV head while one of its query heads
remains).  A contracted axis (linear's in-features) couples the two operands
with each other, never with the output.

The mask helpers live in `fxpress.ops.coupling_masks`.  `fxpress.ops.aten`
attaches these rules to the ops' OpInfo (`coupling`); ops without an OpInfo
(embedding, pooling, cos/sin, ...) are looked up here directly
(`coupling_rule`).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch

from fxpress.ir.graph import META_KEY
from fxpress.ir.opinfo import op_info
from fxpress.ops.coupling_masks import (CouplingContext, Mask, broadcast_args, compress, couple_axes, couple_joint,
                                        full_along, is_tensor, link, link_operands, schema_arg)

aten = torch.ops.aten
__all__ = ["COUPLING_RULES", "CouplingContext", "compress", "coupling_rule"]


# -- rules ------------------------------------------------------------------------------------------
def _identity(ctx: CouplingContext) -> None:
    link(ctx, ctx.node.args[0], lambda m: m, lambda m: m)


def _broadcast(ctx: CouplingContext) -> None:
    broadcast_args(ctx, list(ctx.node.args))


def _nothing(ctx: CouplingContext) -> None:
    """Ops that yield no tensor (shape reads, metadata asserts)."""


def _linear(ctx: CouplingContext) -> None:
    x, weight = ctx.node.args[:2]
    bias = ctx.node.args[2] if len(ctx.node.args) > 2 else None
    rank = len(ctx.shape(ctx.node))
    link(ctx, x, lambda m: m.all(-1, keepdim=True), lambda m: m.all(-1, keepdim=True))
    couple_axes(ctx, x, rank - 1, weight, 1)
    couple_axes(ctx, weight, 0, ctx.node, rank - 1)
    couple_axes(ctx, bias, 0, ctx.node, rank - 1)


def _matmul_operands(ctx: CouplingContext, left: Node, right: Node) -> None:
    out_rank = len(ctx.shape(ctx.node))
    if len(ctx.shape(left)) < 2 or len(ctx.shape(right)) < 2:
        raise ctx.fail("matmul with a 1-D operand has no coupling rule")
    for operand in (left, right):
        rank = len(ctx.shape(operand))
        for axis in range(rank - 2):
            if ctx.shape(operand)[axis] == ctx.shape(ctx.node)[axis + out_rank - rank] > 1:
                couple_axes(ctx, operand, axis, ctx.node, axis + out_rank - rank)
    rank_l, rank_r = len(ctx.shape(left)), len(ctx.shape(right))
    couple_axes(ctx, left, rank_l - 2, ctx.node, out_rank - 2)
    couple_axes(ctx, right, rank_r - 1, ctx.node, out_rank - 1)
    if ctx.shape(left)[:-2] == ctx.shape(right)[:-2] and rank_l > 2:  # contracted axis per batch entry (head)
        link_operands(ctx, left, right, lambda m: m.all(-2, keepdim=True).transpose(-1, -2),
                      lambda m: m.all(-1, keepdim=True).transpose(-1, -2))
    else:
        couple_axes(ctx, left, rank_l - 1, right, rank_r - 2)


def _matmul(ctx: CouplingContext) -> None:
    _matmul_operands(ctx, *ctx.node.args[:2])


def _addmm(ctx: CouplingContext) -> None:
    _matmul_operands(ctx, ctx.node.args[1], ctx.node.args[2])
    broadcast_args(ctx, [ctx.node.args[0]])


def _conv(ctx: CouplingContext) -> None:
    x, weight, bias = ctx.node.args[:3]
    if ctx.node.target == aten.convolution.default and schema_arg(ctx.node, "transposed"):
        raise ctx.fail("transposed convolutions have no coupling rule")
    groups = schema_arg(ctx.node, "groups", 1) or 1
    couple_axes(ctx, x, 0, ctx.node, 0)
    couple_axes(ctx, weight, 0, ctx.node, 1)
    couple_axes(ctx, bias, 0, ctx.node, 1)
    channels_in, channels_out = ctx.shape(x)[1], ctx.shape(ctx.node)[1]
    if groups == 1:
        couple_axes(ctx, x, 1, weight, 1)
    elif groups == channels_in and ctx.shape(weight)[1] == 1:  # depthwise, with a channel multiplier
        couple_axes(ctx, x, 1, ctx.node, 1, repeat=channels_out // channels_in)
    else:
        raise ctx.fail(f"grouped convolution (groups={groups}) couples channels within groups; "
                       "only groups=1 and depthwise have a rule")


def _batch_norm(ctx: CouplingContext) -> None:
    names = ("weight", "bias", "running_mean", "running_var")
    multi = ctx.node.target != aten.batch_norm.default
    out_item = 0 if multi else None
    link(ctx, ctx.node.args[0], lambda m: m, lambda m: m, out_item=out_item)
    for name in names:
        param = schema_arg(ctx.node, name)
        if is_tensor(param):
            couple_axes(ctx, ctx.node.args[0], 1, param, 0)


def _layer_norm(ctx: CouplingContext) -> None:
    x = ctx.node.args[0]
    multi = ctx.node.target == aten.native_layer_norm.default
    link(ctx, x, lambda m: m, lambda m: m, out_item=0 if multi else None)
    rank = len(ctx.shape(x))
    for name in ("weight", "bias"):
        param = schema_arg(ctx.node, name)
        if is_tensor(param):
            lead = rank - len(ctx.shape(param))
            for axis in range(len(ctx.shape(param))):
                couple_axes(ctx, x, lead + axis, param, axis)


def _embedding(ctx: CouplingContext) -> None:
    weight, indices = ctx.node.args[:2]
    rank = len(ctx.shape(ctx.node))
    couple_axes(ctx, weight, 1, ctx.node, rank - 1)
    link(ctx, indices, lambda m: m.unsqueeze(-1), lambda m: m.all(-1))


def _sdpa(ctx: CouplingContext) -> None:
    """q (..., Hq, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev) -> out (..., Hq, L, Ev); Hq = g * Hk."""
    query, key, value = ctx.node.args[:3]
    out, rank = ctx.node, len(ctx.shape(query))
    head, rows, lead = rank - 3, rank - 2, list(range(rank - 3))
    group = ctx.shape(query)[head] // ctx.shape(key)[head]
    couple_joint(ctx, query, out, lead + [head, rows])
    couple_joint(ctx, key, value, lead + [head, rows])
    couple_joint(ctx, key, query, lead + [head, rank - 1], head, group)
    couple_joint(ctx, value, out, lead + [head, rank - 1], head, group)
    mask = schema_arg(ctx.node, "attn_mask")
    if is_tensor(mask):
        mask_rank = len(ctx.shape(mask))
        for mask_axis, tensor, axis in ((-1, key, rows), (-2, query, rows), (-3, query, head)):
            if mask_rank >= -mask_axis and ctx.shape(mask)[mask_axis] > 1:
                couple_axes(ctx, mask, mask_rank + mask_axis, tensor, axis)


def _reshape(ctx: CouplingContext) -> None:
    """view / reshape / flatten / squeeze / unsqueeze: the same elements in a new shape."""
    x = ctx.node.args[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(ctx.node)
    link(ctx, x, lambda m: compress(m.expand(in_shape).reshape(out_shape)),
         lambda m: compress(m.expand(out_shape).reshape(in_shape)))


def _transpose(ctx: CouplingContext) -> None:
    first, second = ctx.node.args[1:3]
    link(ctx, ctx.node.args[0], lambda m: m.transpose(first, second), lambda m: m.transpose(first, second))


def _permute(ctx: CouplingContext) -> None:
    order = [d % len(ctx.node.args[1]) for d in ctx.node.args[1]]
    inverse = [order.index(axis) for axis in range(len(order))]
    link(ctx, ctx.node.args[0], lambda m: m.permute(order), lambda m: m.permute(inverse))


def _expand(ctx: CouplingContext) -> None:
    broadcast_args(ctx, [ctx.node.args[0]])


def _slice(ctx: CouplingContext) -> None:
    x = ctx.node.args[0]
    rank, in_shape = len(ctx.shape(x)), ctx.shape(x)
    dim = schema_arg(ctx.node, "dim", 0) % rank
    start, end, step = (schema_arg(ctx.node, name, default) for name, default in
                        (("start", None), ("end", None), ("step", 1)))
    span = slice(*slice(start, end, step).indices(in_shape[dim]))
    where = (slice(None),) * dim + (span,)

    def backward(m: Mask) -> Mask:
        shape = list(m.shape)
        shape[dim] = in_shape[dim]
        result = torch.zeros(shape, dtype=torch.bool)
        result[where] = full_along(m, dim, ctx.shape(ctx.node)[dim])
        return result

    link(ctx, x, lambda m: full_along(m, dim, in_shape[dim])[where], backward)


def _select(ctx: CouplingContext) -> None:
    x = ctx.node.args[0]
    in_shape = ctx.shape(x)
    dim, index = ctx.node.args[1] % len(in_shape), ctx.node.args[2] % in_shape[ctx.node.args[1]]

    def backward(m: Mask) -> Mask:
        m = m.unsqueeze(dim)
        result = torch.zeros(full_along(m, dim, in_shape[dim]).shape, dtype=torch.bool)
        result.narrow(dim, index, 1).copy_(m)
        return result

    link(ctx, x, lambda m: full_along(m, dim, in_shape[dim]).select(dim, index), backward)


def _cat(ctx: CouplingContext) -> None:
    tensors = ctx.node.args[0]
    out_shape = ctx.shape(ctx.node)
    dim = (ctx.node.args[1] if len(ctx.node.args) > 1 else 0) % len(out_shape)
    pieces = [ctx.mask(t) for t in tensors]
    if any(p is not None for p in pieces):
        ctx.couple(ctx.node, torch.cat([torch.zeros(ctx.shape(t), dtype=torch.bool) if p is None
                                        else p.expand(ctx.shape(t)) for t, p in zip(tensors, pieces)], dim))
    found = ctx.mask(ctx.node)
    if found is not None:
        parts = found.expand(out_shape).split([ctx.shape(t)[dim] for t in tensors], dim)
        for tensor, part in zip(tensors, parts):
            ctx.couple(tensor, part)


def _split(ctx: CouplingContext) -> None:
    """split / chunk / split_with_sizes / unbind: one mask per output (`getitem` picks them)."""
    x = ctx.node.args[0]
    in_shape = ctx.shape(x)
    unbind = ctx.node.target == aten.unbind.int
    dim = schema_arg(ctx.node, "dim", 0) % len(in_shape)
    count = in_shape[dim] if unbind else 1 + len(ctx.node.meta[META_KEY].extra_outputs)
    sizes = [ctx.shape(ctx.node, k)[dim] for k in range(count)] if not unbind else [1] * count
    found = ctx.mask(x)
    if found is not None:
        for item, part in enumerate(found.expand(in_shape).split(sizes, dim)):
            ctx.couple(ctx.node, part.squeeze(dim) if unbind else part, item)
    parts = [ctx.mask(ctx.node, k) for k in range(count)]
    if any(p is not None for p in parts):
        shapes = [ctx.shape(ctx.node, k) for k in range(count)]
        full = [torch.zeros(s, dtype=torch.bool) if p is None else p.expand(s) for p, s in zip(parts, shapes)]
        ctx.couple(x, torch.stack(full, dim) if unbind else torch.cat(full, dim))


def _getitem(ctx: CouplingContext) -> None:
    source, item = ctx.node.args
    link(ctx, source, lambda m: m, lambda m: m, arg_item=item)


def _reduce(ctx: CouplingContext) -> None:
    x = ctx.node.args[0]
    rank = len(ctx.shape(x))
    dims = ctx.node.args[1] if len(ctx.node.args) > 1 else None
    dims = sorted({d % rank for d in ([dims] if isinstance(dims, int) else dims or range(rank))})
    keepdim = bool(ctx.node.args[2]) if len(ctx.node.args) > 2 else bool(ctx.node.kwargs.get("keepdim"))

    def forward(m: Mask) -> Mask:
        m = m.all(dim=dims, keepdim=True)
        return m if keepdim else m.reshape([s for a, s in enumerate(m.shape) if a not in dims])

    def backward(m: Mask) -> Mask:
        return m if keepdim else m.reshape([1 if a in dims else m.shape[a - sum(d < a for d in dims)]
                                            for a in range(rank)])

    link(ctx, x, forward, backward)


def _pool(ctx: CouplingContext, spatial: int) -> None:
    x = ctx.node.args[0]
    for axis in range(len(ctx.shape(x)) - spatial):
        couple_axes(ctx, x, axis, ctx.node, axis)


_IDENTITY_OPS = (aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
                 aten.exp.default, aten.log.default, aten.neg.default, aten.rsqrt.default, aten.sqrt.default,
                 aten.abs.default, aten.cos.default, aten.sin.default, aten.dropout.default,
                 aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
                 aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
                 aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten.special_softmax.default,
                 aten.ones_like.default, aten.zeros_like.default, aten.empty_like.default, aten.full_like.default)
_BROADCAST_OPS = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
                  aten.where.ScalarOther, aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar, aten.maximum.default,
                  aten.minimum.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.__and__.Tensor,
                  aten.__or__.Tensor, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.eq.Tensor,
                  aten.ne.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor,
                  aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.le.Scalar, aten.gt.Scalar,
                  aten.ge.Scalar)
_RESHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
_POOL_OPS = {aten.max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool3d.default: 3,
             aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3,
             aten.adaptive_avg_pool1d.default: 1, aten.adaptive_avg_pool2d.default: 2,
             aten.adaptive_avg_pool3d.default: 3, aten.adaptive_max_pool2d.default: 2}

COUPLING_RULES: dict[object, Callable[[CouplingContext], None]] = {
    **{op: _identity for op in _IDENTITY_OPS}, **{op: _broadcast for op in _BROADCAST_OPS},
    **{op: _reshape for op in _RESHAPE_OPS},
    **{op: (lambda ctx, k=k: _pool(ctx, k)) for op, k in _POOL_OPS.items()},
    aten.linear.default: _linear, aten.matmul.default: _matmul, aten.mm.default: _matmul,
    aten.bmm.default: _matmul, aten.addmm.default: _addmm, aten.baddbmm.default: _addmm,
    aten.conv1d.default: _conv, aten.conv2d.default: _conv, aten.conv3d.default: _conv,
    aten.convolution.default: _conv, aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.layer_norm.default: _layer_norm, aten.native_layer_norm.default: _layer_norm,
    aten.rms_norm.default: _layer_norm, aten.embedding.default: _embedding,
    aten.scaled_dot_product_attention.default: _sdpa, aten.transpose.int: _transpose,
    aten.permute.default: _permute, aten.expand.default: _expand, aten.slice.Tensor: _slice,
    aten.select.int: _select, aten.cat.default: _cat, aten.split.Tensor: _split, aten.chunk.default: _split,
    aten.split_with_sizes.default: _split, aten.unbind.int: _split, operator.getitem: _getitem,
    aten.mean.dim: _reduce, aten.sum.dim_IntList: _reduce, aten.amax.default: _reduce,
    aten.sym_size.int: _nothing, aten._assert_tensor_metadata.default: _nothing,
    # new_* read only the input's dtype and device: their size is an argument, not the input's shape
    **{op: _nothing for op in (aten.new_ones.default, aten.new_zeros.default, aten.new_full.default,
                               aten.new_empty.default)},
}


def coupling_rule(target: object) -> Callable[[CouplingContext], None] | None:
    """The coupling rule of an op, from its OpInfo (every op with a rule here has one: see ops/aten.py)."""
    info = op_info(target)
    return info.coupling if info is not None else None
