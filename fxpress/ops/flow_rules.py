"""How a tracked dimension moves through each op: the dimension-flow rules of the dialect.

A rule receives a `FlowContext` (the tracker's view of one node: `ctx.node`,
`ctx.axes(arg)` for a tracked input's axes, `ctx.tracked(arg)` for the raw
record of a multi-output node, `ctx.size(offset)`, `ctx.patch(...)`,
`ctx.foreign(...)`, `ctx.select_ok(index)`, `ctx.fail(why)`) and returns the
output's tracked axes: `{axis: offset}` (the axis has `count + offset`
entries), a list of those for multi-output nodes, or None (no tensor out).
The tracker itself is `fxpress.analysis.token_flow`; `fxpress.ops.aten`
attaches these rules to the ops' OpInfo.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Protocol

import torch
from torch.fx import Node

from fxpress.ir.graph import META_KEY, shape_of

aten = torch.ops.aten
Axes = dict[int, int]  # tracked axis -> offset from the segment's count


class FlowContext(Protocol):
    """What a flow rule sees (implemented by the tracker)."""

    node: Node

    def axes(self, arg: Any) -> Axes | None: ...
    def tracked(self, arg: Any) -> Any: ...
    def size(self, offset: int) -> int: ...
    def patch(self, arg: int, item: int | None, offset: int, source_axis: int) -> None: ...
    def foreign(self, arg: int | str, tensor: Any, axes: list[int]) -> None: ...
    def select_ok(self, index: int) -> bool: ...
    def fail(self, why: str) -> Exception: ...


def dim_index(value: int, rank: int) -> int:
    """A possibly negative dim as a non-negative index."""
    return value % rank if rank else value


# -- rules ------------------------------------------------------------------------------------------
def _same(ctx: FlowContext) -> Axes:
    return dict(ctx.axes(ctx.node.args[0]))


def linear_flow(ctx: FlowContext) -> Axes:
    """A linear layer (dense or binary): tokens ride on every axis but the contracted last one."""
    axes = _same(ctx)
    if len(shape_of(ctx.node)) - 1 in axes:
        raise ctx.fail("the token axis is the contracted (last) axis of a linear layer")
    return axes


def _broadcast(ctx: FlowContext) -> Axes:
    """Elementwise with broadcasting: token axes of every input, aligned from the right."""
    out_shape, result = shape_of(ctx.node), {}
    for position, arg in enumerate(ctx.node.args):
        arg_shape = shape_of(arg)
        lead = len(out_shape) - len(arg_shape)
        if ctx.axes(arg) is not None:
            result.update({a + lead: off for a, off in ctx.axes(arg).items() if arg_shape[a] == out_shape[a + lead]})
    for position, arg in enumerate(ctx.node.args):
        if ctx.axes(arg) is None and isinstance(arg, Node) and shape_of(arg):
            lead = len(out_shape) - len(shape_of(arg))
            ctx.foreign(position, arg, [a - lead for a, off in result.items()
                                        if a >= lead and shape_of(arg)[a - lead] == ctx.size(off) > 1])
    return result


def _transpose(ctx: FlowContext) -> Axes:
    rank = len(shape_of(ctx.node))
    first, second = (dim_index(d, rank) for d in ctx.node.args[1:3])
    swap = {first: second, second: first}
    return {swap.get(a, a): off for a, off in _same(ctx).items()}


def _permute(ctx: FlowContext) -> Axes:
    order = [dim_index(d, len(ctx.node.args[1])) for d in ctx.node.args[1]]
    axes = _same(ctx)
    return {order.index(a): off for a, off in axes.items()}


def _unsqueeze(ctx: FlowContext) -> Axes:
    dim = dim_index(ctx.node.args[1], len(shape_of(ctx.node)))
    return {a + (a >= dim): off for a, off in _same(ctx).items()}


def _drop_dims(axes: Axes, dims: set[int]) -> Axes:
    return {a - sum(d < a for d in dims): off for a, off in axes.items() if a not in dims}


def _squeeze(ctx: FlowContext) -> Axes:
    rank = len(shape_of(ctx.node.args[0]))
    dims = ctx.node.args[1] if len(ctx.node.args) > 1 else range(rank)
    dims = {dim_index(d, rank) for d in ([dims] if isinstance(dims, int) else dims) if shape_of(ctx.node.args[0])[
        dim_index(d, rank)] == 1}
    return _drop_dims(_same(ctx), dims)


def _reduce(ctx: FlowContext) -> Axes:
    rank = len(shape_of(ctx.node.args[0]))
    dims = ctx.node.args[1] if len(ctx.node.args) > 1 else list(range(rank))
    dims = {dim_index(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
    keepdim = bool(ctx.node.args[2]) if len(ctx.node.args) > 2 else bool(ctx.node.kwargs.get("keepdim", False))
    axes = _same(ctx)
    return {a: off for a, off in axes.items() if a not in dims} if keepdim else _drop_dims(axes, dims)


def _select(ctx: FlowContext) -> Axes:
    dim = dim_index(ctx.node.args[1], len(shape_of(ctx.node.args[0])))
    axes = _same(ctx)
    if dim in axes and not ctx.select_ok(ctx.node.args[2] - axes[dim]):
        raise ctx.fail(f"it picks token {ctx.node.args[2]}, whose position the token "
                                      "reduction does not keep")
    return _drop_dims(axes, {dim})


def _slice(ctx: FlowContext) -> Axes:
    args = list(ctx.node.args) + [0, None, None, 1][len(ctx.node.args) - 1:]
    dim = dim_index(args[1], len(shape_of(ctx.node.args[0])))
    axes = _same(ctx)
    if dim not in axes:
        return axes
    start, end, step = args[2] or 0, args[3], args[4]
    old = ctx.size(axes[dim])
    if step != 1 or start < 0 or (isinstance(end, int) and end < old):
        raise ctx.fail("it slices a fixed range of tokens; only x[:, k:] is supported")
    if isinstance(end, Node) or end == old:
        ctx.patch(3, None, axes[dim], dim)
    axes[dim] -= start
    return axes


def _map_reshape(ctx: FlowContext, in_shape: tuple, out_shape: tuple, axes: Axes,
                 sources: dict[int, int] | None = None) -> Axes:
    """Token axes after a reshape; `sources` (when given) receives output axis -> input axis."""
    result = {}
    for axis, off in axes.items():
        prefix = math.prod(in_shape[:axis])
        match = [j for j in range(len(out_shape)) if math.prod(out_shape[:j]) == prefix
                 and out_shape[j] == in_shape[axis]]
        if not match:
            raise ctx.fail(f"it folds token axis {axis} of {list(in_shape)} into another axis")
        result[match[0]] = off
        if sources is not None:
            sources[match[0]] = axis
    return result


def _reshape(ctx: FlowContext) -> Axes:
    sources: dict[int, int] = {}
    axes = _map_reshape(ctx, shape_of(ctx.node.args[0]), shape_of(ctx.node), _same(ctx), sources)
    for axis, off in axes.items():
        if ctx.node.args[1][axis] != -1:
            ctx.patch(1, axis, off, sources[axis])
    return axes


def _flatten(ctx: FlowContext) -> Axes:
    return _map_reshape(ctx, shape_of(ctx.node.args[0]), shape_of(ctx.node), _same(ctx))


def _expand(ctx: FlowContext) -> Axes:
    lead = len(shape_of(ctx.node)) - len(shape_of(ctx.node.args[0]))
    axes = {a + lead: off for a, off in _same(ctx).items()}
    for axis, off in axes.items():
        if ctx.node.args[1][axis] != -1:
            ctx.patch(1, axis, off, axis - lead)
    return axes


def _matmul(ctx: FlowContext) -> Axes:
    left, right = ctx.node.args[:2]
    out_rank, result = len(shape_of(ctx.node)), {}
    for arg, row, contracted in ((left, -2, -1), (right, -1, -2)):
        rank, axes = len(shape_of(arg)), ctx.axes(arg) or {}
        for axis, off in axes.items():
            if axis == rank + row:
                result[out_rank + row] = off
            elif axis != rank + contracted:
                result[axis + out_rank - rank] = off
    for arg, other, contracted, other_contracted in ((left, right, -1, -2), (right, left, -2, -1)):
        other_axes = ctx.axes(other) or {}
        hit = [a for a, off in other_axes.items() if a == len(shape_of(other)) + other_contracted]
        if ctx.axes(arg) is None and hit:
            ctx.foreign(ctx.node.args.index(arg), arg, [len(shape_of(arg)) + contracted])
    return result


def _sdpa(ctx: FlowContext) -> Axes:
    query, key = ctx.node.args[:2]
    q_axes, k_axes = ctx.axes(query) or {}, ctx.axes(key) or {}
    mask_arg = 3 if len(ctx.node.args) > 3 else "attn_mask"
    mask = ctx.node.args[3] if mask_arg == 3 else ctx.node.kwargs.get("attn_mask")
    if isinstance(mask, Node) and ctx.axes(mask) is None and shape_of(mask):
        rank, q_rank, k_rank = len(shape_of(mask)), len(shape_of(query)), len(shape_of(key))
        hits = []
        if q_rank - 2 in q_axes and shape_of(mask)[-2] == ctx.size(q_axes[q_rank - 2]) > 1:
            hits.append(rank - 2)
        if k_rank - 2 in k_axes and shape_of(mask)[-1] == ctx.size(k_axes[k_rank - 2]) > 1:
            hits.append(rank - 1)
        ctx.foreign(mask_arg, mask, hits)
    return {a: off for a, off in q_axes.items() if a != len(shape_of(query)) - 1}


def _unbind(ctx: FlowContext) -> list[Axes]:
    rank = len(shape_of(ctx.node.args[0]))
    dim = dim_index(ctx.node.args[1] if len(ctx.node.args) > 1 else 0, rank)
    axes = _same(ctx)
    if dim in axes:
        raise ctx.fail("it unbinds the token axis")
    return [_drop_dims(axes, {dim})] * shape_of(ctx.node.args[0])[dim]


def _split(ctx: FlowContext) -> list[Axes]:
    dim = dim_index(ctx.node.args[2] if len(ctx.node.args) > 2 else 0, len(shape_of(ctx.node.args[0])))
    axes = _same(ctx)
    if dim in axes:
        raise ctx.fail("it splits along the token axis")
    record = ctx.node.meta[META_KEY]
    return [dict(axes) for _ in range(1 + len(record.extra_outputs))]


def _getitem(ctx: FlowContext) -> Axes | None:
    found = ctx.tracked(ctx.node.args[0])
    return dict(found[ctx.node.args[1]]) if isinstance(found, list) else None


def _cat(ctx: FlowContext) -> Axes:
    tensors = ctx.node.args[0]
    dim = dim_index(ctx.node.args[1] if len(ctx.node.args) > 1 else 0, len(shape_of(ctx.node)))
    axes = next(ctx.axes(t) for t in tensors if ctx.axes(t) is not None)
    if dim in axes:
        raise ctx.fail("it concatenates along the token axis")
    if any(ctx.axes(t) is None for t in tensors):
        raise ctx.fail("it concatenates token tensors with tensors sized for the old token count")
    return dict(axes)


def _no_output(ctx: FlowContext) -> None:
    return None


_SAME_OPS = (aten.layer_norm.default, aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
             aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
             aten.dropout.default, aten.contiguous.default, aten.clone.default, aten.to.dtype,
             aten._to_copy.default, aten.alias.default, aten.detach.default, aten.exp.default,
             aten.log.default, aten.neg.default, aten.rsqrt.default, aten.sqrt.default, aten.abs.default,
             aten.type_as.default, aten.rms_norm.default)
_BROADCAST_OPS = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
                  aten.pow.Tensor_Tensor, aten.maximum.default, aten.minimum.default, aten.masked_fill.Scalar,
                  aten.masked_fill.Tensor, aten.pow.Tensor_Scalar, aten.where.ScalarOther)

FLOW_RULES: dict[object, Any] = {
    **{op: _same for op in _SAME_OPS}, **{op: _broadcast for op in _BROADCAST_OPS},
    aten.linear.default: linear_flow, aten.transpose.int: _transpose, aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze, aten.squeeze.dim: _squeeze, aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze, aten.mean.dim: _reduce, aten.sum.dim_IntList: _reduce,
    aten.amax.default: _reduce, aten.select.int: _select, aten.slice.Tensor: _slice,
    aten.reshape.default: _reshape, aten.view.default: _reshape, aten._unsafe_view.default: _reshape,
    aten.flatten.using_ints: _flatten, aten.expand.default: _expand, aten.matmul.default: _matmul,
    aten.bmm.default: _matmul, aten.scaled_dot_product_attention.default: _sdpa, aten.unbind.int: _unbind,
    aten.split.Tensor: _split, aten.chunk.default: _split, aten.split_with_sizes.default: _split,
    operator.getitem: _getitem, aten.cat.default: _cat, aten.sym_size.int: _no_output,
    aten._assert_tensor_metadata.default: _no_output,
}


def _int_literals(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [i for item in value for i in _int_literals(item)]
    return []


def default_rule(ctx: FlowContext) -> Axes:
    """An op without a rule: followed only when it keeps its input's shape and names no token count."""
    first = next(a for a in ctx.node.all_input_nodes if ctx.axes(a) is not None)
    literals = _int_literals(list(ctx.node.args) + list(ctx.node.kwargs.values()))
    if shape_of(ctx.node) != shape_of(first) or any(v == ctx.size(off) for v in literals
                                                    for off in ctx.axes(first).values()):
        raise ctx.fail(f"op {ctx.node.target} has no token-axis rule; add a flow rule to FLOW_RULES "
                                      "in fxpress/ops/flow_rules.py")
    return dict(ctx.axes(first))


