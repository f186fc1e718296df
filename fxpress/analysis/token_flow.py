"""Follow the token axis through a graph so a token count can change mid-graph.

torch.export specializes shapes: after a pass shortens the token sequence,
downstream nodes still say `reshape(x, [2, 50, 3, 4, 16])` or
`reshape(x, [s0, s1, 64])` with `s1` read from the input.  `trace_token_axes`
walks the graph from seed nodes (each the residual stream, tokens on axis 1,
where one token count starts) and records, per node, which axes hold tokens
(`axis -> offset`: the axis has `count + offset` entries).  Per-op rules in
`fxpress/ops/flow_rules.py` (each op's OpInfo.flow) map axes from inputs to output and note `SizePatch`es: list
entries of `reshape`/`view`/`expand` sizes and `slice` ends that must become
the new count.  An op without a rule is followed only when it keeps its
input's shape and has no integer argument equal to the token count;
otherwise a PreconditionError names the op and the node.

Tensors that do not come from a seed but line up with a token axis (an
attention mask built for 50 tokens, a per-position parameter) are recorded
as `ForeignInput`s for the pass to resolve (see `token_resize.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.fx import Node

from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph, shape_of
from fxpress.ir.opinfo import op_info
from fxpress.ops.flow_rules import default_rule, dim_index

aten = torch.ops.aten
Axes = dict[int, int]  # token axis -> offset from the segment's token count


@dataclass
class SizePatch:
    """`node.args[arg]` (or its list entry `item`) must become the segment's count + offset, which is the
    size of axis `source_axis` of the node's first argument (the tracked tensor it reshapes or slices)."""

    node: Node
    arg: int
    item: int | None
    segment: int
    offset: int
    source_axis: int


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


class _Ctx:
    """What a rule sees: the node, its tracked inputs, and ways to record patches and foreign inputs."""

    def __init__(self, node: Node, flow: TokenFlow, segment: int):
        self.node, self.flow, self.segment = node, flow, segment

    def axes(self, arg: Any) -> Axes | None:
        found = self.flow.axes.get(arg) if isinstance(arg, Node) else None
        return found if isinstance(found, dict) else None

    def tracked(self, arg: Any) -> Any:
        return self.flow.axes.get(arg) if isinstance(arg, Node) else None

    def size(self, offset: int) -> int:
        return self.flow.old_count + offset

    def patch(self, arg: int, item: int | None, offset: int, source_axis: int) -> None:
        self.flow.patches.append(SizePatch(self.node, arg, item, self.segment, offset, source_axis))

    def foreign(self, arg: int | str, tensor: Any, axes: list[int]) -> None:
        if isinstance(tensor, Node) and axes:
            self.flow.foreign.append(ForeignInput(self.node, arg, tensor, tuple(sorted(set(axes))), self.segment))

    def select_ok(self, index: int) -> bool:
        return self.flow.select_ok(index)

    def fail(self, why: str) -> PreconditionError:
        return self.flow.fail(self.node, why)


def _rule(target: object):
    info = op_info(target)
    return info.flow if info is not None and info.flow is not None else default_rule


def trace_token_axes(graph: Graph, seeds: dict[Node, int], *, pass_name: str = "token-axes",
                     select_ok: Callable[[int], bool] = lambda index: index == 0) -> TokenFlow:
    """Token axes of every node downstream of `seeds` (node -> segment; tokens on axis 1 there)."""
    first = next(iter(seeds))
    flow = TokenFlow(old_count=shape_of(first)[1], pass_name=pass_name, select_ok=select_ok)
    for node in graph.fx.nodes:
        tracked = [a for a in node.all_input_nodes if a in flow.axes]
        if tracked and node.op == "call_function":
            segment = max(flow.segment[a] for a in tracked)
            result = _rule(node.target)(_Ctx(node, flow, segment))
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
                axes.get(dim_index(user.args[1], len(shape_of(node)))) == 0
            if not first:
                return False
    return True
