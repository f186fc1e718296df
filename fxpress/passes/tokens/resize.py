"""Make a graph's shapes follow a new token count: size patches and foreign inputs.

After a pass inserts a token-reduction op, `apply_size_patches` rewrites the
sizes `trace_token_axes` found (`reshape(x, [2, 50, 64])` ->
`reshape(x, [2, sym_size(x, 1), 64])`), so the graph is generic in the
token count, whatever the example inputs were.

Foreign inputs (tensors sized for the old count that do not come from the
token stream) are resolved by `resolve_foreign_inputs`:

- prefix slice (tail-drop only): a tensor computed from parameters alone is
  indexed by token position, and the kept tokens are a prefix, so
  `param[:, :keep]` is exact;
- neutral: a tensor computed without reading input data (only shapes) whose
  value is the identity of its use (all-True or all-zero attention mask,
  zeros added, ones multiplied) is dropped;
- anything else raises a PreconditionError naming both nodes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from fxpress.analysis.recorder import record_values
from fxpress.errors import PreconditionError
from fxpress.ir.builder import Builder
from fxpress.ir.graph import Graph
from fxpress.ir.rewrite import erase_dead, reaches_input
from fxpress.analysis.token_flow import ForeignInput, TokenFlow, shape_of

aten = torch.ops.aten


def apply_size_patches(build: Builder, flow: TokenFlow) -> int:
    """Replace every recorded token-count literal by the size of the tracked tensor the node reads.

    `reshape(x, [2, 50, 64])` becomes `reshape(x, [2, sym_size(x, 1), 64])`: the count is read where it
    is used, so the rewritten graph holds no reference from one block to another's token count.
    """
    for patch in flow.patches:
        value = build.call_before(patch.node, aten.sym_size.int, patch.node.args[0], patch.source_axis)
        args = list(patch.node.args)
        if patch.item is None:
            args[patch.arg] = value
        else:
            sizes = list(args[patch.arg])
            sizes[patch.item] = value
            args[patch.arg] = sizes
        patch.node.args = tuple(args)
    return len(flow.patches)


def foreign_values(graph: Graph, flow: TokenFlow) -> dict[Node, torch.Tensor]:
    """Values of the foreign tensors on the example inputs (run before the graph is rewritten)."""
    wanted = {f.tensor for f in flow.foreign}
    if not wanted:
        return {}
    values = record_values(graph, graph.example_inputs, [node.name for node in wanted])
    return {node: values[node.name] for node in wanted}


def _tracked_operand(user: Node, flow: TokenFlow) -> Node | None:
    operands = [a for a in user.args if isinstance(a, Node) and a in flow.axes]
    return operands[0] if len(operands) == 1 and shape_of(operands[0]) == shape_of(user) else None


def _neutral_for(user: Node, arg: int | str, value: torch.Tensor) -> bool:
    if user.target == aten.scaled_dot_product_attention.default:
        return bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())
    if user.target in (aten.add.Tensor,) or (user.target == aten.sub.Tensor and arg == 1):
        return bool((value == 0).all())
    if user.target == aten.mul.Tensor:
        return bool((value == 1).all())
    if user.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and arg == 1:
        return not bool(value.any())
    return False


def _drop_neutral(graph: Graph, item: ForeignInput, flow: TokenFlow) -> str:
    user = item.user
    if user.target == aten.scaled_dot_product_attention.default:
        if item.arg == "attn_mask":
            user.kwargs = {**user.kwargs, "attn_mask": None}
        else:
            user.args = user.args[:3] + (None,) + user.args[4:]
        return f"dropped neutral mask {item.tensor.name} from {user.name}"
    operand = _tracked_operand(user, flow)
    if operand is None:
        raise _foreign_error(item, flow, "it is neutral but its user changes the shape")
    user.replace_all_uses_with(operand)
    graph.fx.erase_node(user)
    return f"removed {user.name} ({user.target} by a neutral {item.tensor.name})"


def _slice_prefix(build: Builder, item: ForeignInput, counts: dict[int, Node]) -> str:
    value: Any = item.tensor
    with build.before(item.user) as at:
        for axis in item.axes:
            value = at.call(aten.slice.Tensor, value, axis, 0, counts[item.segment])
    if isinstance(item.arg, str):
        item.user.kwargs = {**item.user.kwargs, item.arg: value}
    else:
        item.user.args = item.user.args[:item.arg] + (value,) + item.user.args[item.arg + 1:]
    return f"sliced {item.tensor.name} to the kept tokens for {item.user.name}"


def _foreign_error(item: ForeignInput, flow: TokenFlow, why: str) -> PreconditionError:
    return PreconditionError(
        f"{item.user.format_node()} combines the token sequence with {item.tensor.format_node()}, which is "
        f"sized for {flow.old_count} tokens on axes {list(item.axes)}: {why}. Reduce tokens after it, or "
        f"capture the model without it", flow.pass_name)


def resolve_foreign_inputs(graph: Graph, build: Builder, flow: TokenFlow, counts: dict[int, Node],
                           values: dict[Node, torch.Tensor], *, prefix_slice: bool) -> list[str]:
    """Slice, drop or reject every foreign input (see the module doc); describe what was done."""
    done = []
    for item in flow.foreign:
        if prefix_slice and not reaches_input(item.tensor, through_shapes=True):
            done.append(_slice_prefix(build, item, counts))
        elif not reaches_input(item.tensor, through_shapes=False) and \
                _neutral_for(item.user, item.arg, values[item.tensor]):
            done.append(_drop_neutral(graph, item, flow))
        else:
            raise _foreign_error(item, flow, "it reads the input data or is not neutral, so it cannot be resized")
    erase_dead(graph, {item.tensor for item in flow.foreign})
    return done
