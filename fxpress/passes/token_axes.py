"""Follow the token axis through a graph so a token count can change mid-graph.

torch.export specializes shapes: after a pass shortens the token sequence,
downstream nodes still say `reshape(x, [2, 50, 3, 4, 16])` or
`reshape(x, [s0, s1, 64])` with `s1` read from the input.  `trace_token_axes`
walks the graph from seed nodes (each the residual stream, tokens on axis 1,
where one token count starts) and records, per node, which axes hold tokens
(`axis -> offset`: the axis has `count + offset` entries).  Per-op rules in
`AXIS_RULES` map axes from inputs to output and note `SizePatch`es: list
entries of `reshape`/`view`/`expand` sizes and `slice` ends that must become
the new count.  An op without a rule is followed only when it keeps its
input's shape and has no integer argument equal to the token count;
otherwise a PreconditionError names the op and the node.

Tensors that do not come from a seed but line up with a token axis (an
attention mask built for 50 tokens, a per-position parameter) are recorded
as `ForeignInput`s for the pass to resolve (see `token_resize.py`).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import Node

from fxpress.errors import PreconditionError
from fxpress.ir.graph import META_KEY, Graph

aten = torch.ops.aten
Axes = dict[int, int]  # token axis -> offset from the segment's token count


@dataclass
class SizePatch:
    """`node.args[arg]` (or its list entry `item`) must become the segment's count + offset."""

    node: Node
    arg: int
    item: int | None
    segment: int
    offset: int


@dataclass
class ForeignInput:
    """`user.args[arg]` is `tensor`, not from a seed, with token-sized axes `axes` (its own dims)."""

    user: Node
    arg: int | str
    tensor: Node
    axes: tuple[int, ...]
    segment: int


@dataclass
class TokenFlow:
    """Result of `trace_token_axes`: token axes and segment of every node downstream of a seed."""

    axes: dict[Node, Any] = field(default_factory=dict)  # Axes, or list[Axes] for multi-output nodes
    segment: dict[Node, int] = field(default_factory=dict)
    patches: list[SizePatch] = field(default_factory=list)
    foreign: list[ForeignInput] = field(default_factory=list)
    old_count: int = 0
    pass_name: str = "token-axes"
    select_ok: Callable[[int], bool] = lambda index: index == 0

    def fail(self, node: Node, why: str) -> PreconditionError:
        return PreconditionError(f"cannot follow the token axis through {node.format_node()}: {why}",
                                 self.pass_name)


def shape_of(node: Any) -> tuple[int, ...]:
    record = node.meta.get(META_KEY) if isinstance(node, Node) else None
    return tuple(record.shape) if record is not None and record.shape is not None else ()


def _dim(value: int, rank: int) -> int:
    return value % rank if rank else value


class _Ctx:
    """What a rule sees: the node, its tracked inputs, and ways to record patches and foreign inputs."""

    def __init__(self, node: Node, flow: TokenFlow, segment: int):
        self.node, self.flow, self.segment = node, flow, segment

    def axes(self, arg: Any) -> Axes | None:
        found = self.flow.axes.get(arg) if isinstance(arg, Node) else None
        return found if isinstance(found, dict) else None

    def size(self, offset: int) -> int:
        return self.flow.old_count + offset

    def patch(self, arg: int, item: int | None, offset: int) -> None:
        self.flow.patches.append(SizePatch(self.node, arg, item, self.segment, offset))

    def foreign(self, arg: int | str, tensor: Any, axes: list[int]) -> None:
        if isinstance(tensor, Node) and axes:
            self.flow.foreign.append(ForeignInput(self.node, arg, tensor, tuple(sorted(set(axes))), self.segment))


# -- rules ------------------------------------------------------------------------------------------
def _same(ctx: _Ctx) -> Axes:
    return dict(ctx.axes(ctx.node.args[0]))


def _linear(ctx: _Ctx) -> Axes:
    axes = _same(ctx)
    if len(shape_of(ctx.node)) - 1 in axes:
        raise ctx.flow.fail(ctx.node, "the token axis is the contracted (last) axis of a linear layer")
    return axes


def _broadcast(ctx: _Ctx) -> Axes:
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


def _transpose(ctx: _Ctx) -> Axes:
    rank = len(shape_of(ctx.node))
    first, second = (_dim(d, rank) for d in ctx.node.args[1:3])
    swap = {first: second, second: first}
    return {swap.get(a, a): off for a, off in _same(ctx).items()}


def _permute(ctx: _Ctx) -> Axes:
    order = [_dim(d, len(ctx.node.args[1])) for d in ctx.node.args[1]]
    axes = _same(ctx)
    return {order.index(a): off for a, off in axes.items()}


def _unsqueeze(ctx: _Ctx) -> Axes:
    dim = _dim(ctx.node.args[1], len(shape_of(ctx.node)))
    return {a + (a >= dim): off for a, off in _same(ctx).items()}


def _drop_dims(axes: Axes, dims: set[int]) -> Axes:
    return {a - sum(d < a for d in dims): off for a, off in axes.items() if a not in dims}


def _squeeze(ctx: _Ctx) -> Axes:
    rank = len(shape_of(ctx.node.args[0]))
    dims = ctx.node.args[1] if len(ctx.node.args) > 1 else range(rank)
    dims = {_dim(d, rank) for d in ([dims] if isinstance(dims, int) else dims) if shape_of(ctx.node.args[0])[
        _dim(d, rank)] == 1}
    return _drop_dims(_same(ctx), dims)


def _reduce(ctx: _Ctx) -> Axes:
    rank = len(shape_of(ctx.node.args[0]))
    dims = ctx.node.args[1] if len(ctx.node.args) > 1 else list(range(rank))
    dims = {_dim(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
    keepdim = bool(ctx.node.args[2]) if len(ctx.node.args) > 2 else bool(ctx.node.kwargs.get("keepdim", False))
    axes = _same(ctx)
    return {a: off for a, off in axes.items() if a not in dims} if keepdim else _drop_dims(axes, dims)


def _select(ctx: _Ctx) -> Axes:
    dim = _dim(ctx.node.args[1], len(shape_of(ctx.node.args[0])))
    axes = _same(ctx)
    if dim in axes and not ctx.flow.select_ok(ctx.node.args[2] - axes[dim]):
        raise ctx.flow.fail(ctx.node, f"it picks token {ctx.node.args[2]}, whose position the token "
                                      "reduction does not keep")
    return _drop_dims(axes, {dim})


def _slice(ctx: _Ctx) -> Axes:
    args = list(ctx.node.args) + [0, None, None, 1][len(ctx.node.args) - 1:]
    dim = _dim(args[1], len(shape_of(ctx.node.args[0])))
    axes = _same(ctx)
    if dim not in axes:
        return axes
    start, end, step = args[2] or 0, args[3], args[4]
    old = ctx.size(axes[dim])
    if step != 1 or start < 0 or (isinstance(end, int) and end < old):
        raise ctx.flow.fail(ctx.node, "it slices a fixed range of tokens; only x[:, k:] is supported")
    if isinstance(end, Node) or end == old:
        ctx.patch(3, None, axes[dim])
    axes[dim] -= start
    return axes


def _map_reshape(ctx: _Ctx, in_shape: tuple, out_shape: tuple, axes: Axes) -> Axes:
    result = {}
    for axis, off in axes.items():
        prefix = math.prod(in_shape[:axis])
        match = [j for j in range(len(out_shape)) if math.prod(out_shape[:j]) == prefix
                 and out_shape[j] == in_shape[axis]]
        if not match:
            raise ctx.flow.fail(ctx.node, f"it folds token axis {axis} of {list(in_shape)} into another axis")
        result[match[0]] = off
    return result


def _reshape(ctx: _Ctx) -> Axes:
    axes = _map_reshape(ctx, shape_of(ctx.node.args[0]), shape_of(ctx.node), _same(ctx))
    for axis, off in axes.items():
        if ctx.node.args[1][axis] != -1:
            ctx.patch(1, axis, off)
    return axes


def _flatten(ctx: _Ctx) -> Axes:
    return _map_reshape(ctx, shape_of(ctx.node.args[0]), shape_of(ctx.node), _same(ctx))


def _expand(ctx: _Ctx) -> Axes:
    lead = len(shape_of(ctx.node)) - len(shape_of(ctx.node.args[0]))
    axes = {a + lead: off for a, off in _same(ctx).items()}
    for axis, off in axes.items():
        if ctx.node.args[1][axis] != -1:
            ctx.patch(1, axis, off)
    return axes


def _matmul(ctx: _Ctx) -> Axes:
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


def _sdpa(ctx: _Ctx) -> Axes:
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


def _unbind(ctx: _Ctx) -> list[Axes]:
    rank = len(shape_of(ctx.node.args[0]))
    dim = _dim(ctx.node.args[1] if len(ctx.node.args) > 1 else 0, rank)
    axes = _same(ctx)
    if dim in axes:
        raise ctx.flow.fail(ctx.node, "it unbinds the token axis")
    return [_drop_dims(axes, {dim})] * shape_of(ctx.node.args[0])[dim]


def _split(ctx: _Ctx) -> list[Axes]:
    dim = _dim(ctx.node.args[2] if len(ctx.node.args) > 2 else 0, len(shape_of(ctx.node.args[0])))
    axes = _same(ctx)
    if dim in axes:
        raise ctx.flow.fail(ctx.node, "it splits along the token axis")
    record = ctx.node.meta[META_KEY]
    return [dict(axes) for _ in range(1 + len(record.extra_outputs))]


def _getitem(ctx: _Ctx) -> Axes | None:
    found = ctx.flow.axes.get(ctx.node.args[0])
    return dict(found[ctx.node.args[1]]) if isinstance(found, list) else None


def _cat(ctx: _Ctx) -> Axes:
    tensors = ctx.node.args[0]
    dim = _dim(ctx.node.args[1] if len(ctx.node.args) > 1 else 0, len(shape_of(ctx.node)))
    axes = next(ctx.axes(t) for t in tensors if ctx.axes(t) is not None)
    if dim in axes:
        raise ctx.flow.fail(ctx.node, "it concatenates along the token axis")
    if any(ctx.axes(t) is None for t in tensors):
        raise ctx.flow.fail(ctx.node, "it concatenates token tensors with tensors sized for the old token count")
    return dict(axes)


def _no_output(ctx: _Ctx) -> None:
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

AXIS_RULES: dict[object, Callable[[_Ctx], Any]] = {
    **{op: _same for op in _SAME_OPS}, **{op: _broadcast for op in _BROADCAST_OPS},
    aten.linear.default: _linear, aten.transpose.int: _transpose, aten.permute.default: _permute,
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


def _default(ctx: _Ctx) -> Axes:
    """An op without a rule: followed only when it keeps its input's shape and names no token count."""
    first = next(a for a in ctx.node.all_input_nodes if ctx.axes(a) is not None)
    literals = _int_literals(list(ctx.node.args) + list(ctx.node.kwargs.values()))
    if shape_of(ctx.node) != shape_of(first) or any(v == ctx.size(off) for v in literals
                                                    for off in ctx.axes(first).values()):
        raise ctx.flow.fail(ctx.node, f"op {ctx.node.target} has no token-axis rule; add one to AXIS_RULES "
                                      "in fxpress/passes/token_axes.py")
    return dict(ctx.axes(first))


def trace_token_axes(graph: Graph, seeds: dict[Node, int], *, pass_name: str = "token-axes",
                     select_ok: Callable[[int], bool] = lambda index: index == 0) -> TokenFlow:
    """Token axes of every node downstream of `seeds` (node -> segment; tokens on axis 1 there)."""
    first = next(iter(seeds))
    flow = TokenFlow(old_count=shape_of(first)[1], pass_name=pass_name, select_ok=select_ok)
    for node in graph.fx.nodes:
        tracked = [a for a in node.all_input_nodes if a in flow.axes]
        if tracked and node.op == "call_function":
            segment = max(flow.segment[a] for a in tracked)
            result = AXIS_RULES.get(node.target, _default)(_Ctx(node, flow, segment))
            if result is not None:
                flow.axes[node], flow.segment[node] = result, segment
        elif tracked and node.op != "output":
            raise flow.fail(node, f"{node.op} nodes are not followed")
        if node in seeds:
            flow.axes[node], flow.segment[node] = {1: 0}, seeds[node]
    return flow


MIXING_OPS = (aten.matmul.default, aten.bmm.default, aten.scaled_dot_product_attention.default)
_SHAPE_READS = (aten.sym_size.int, aten._assert_tensor_metadata.default)


def reads_only_first_token(graph: Graph, seed: Node) -> bool:
    """Whether the tokens of `seed` (axis 1) reach the outputs only as token 0, never mixed with each other.

    True for the residual stream after the last attention of a ViT that classifies from CLS: what
    happens to the other tokens there cannot change the outputs.
    """
    try:
        flow = trace_token_axes(graph, {seed: 0}, select_ok=lambda index: True)
    except PreconditionError:
        return False
    for node, axes in flow.axes.items():
        if not axes:
            continue
        if node.target in MIXING_OPS:
            return False
        for user in node.users:
            if flow.axes.get(user) or user.target in _SHAPE_READS:
                continue
            first = user.target == aten.select.int and isinstance(axes, dict) and user.args[2] == 0 and \
                axes.get(_dim(user.args[1], len(shape_of(node)))) == 0
            if not first:
                return False
    return True
