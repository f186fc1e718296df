"""Make a graph's shapes follow a new token count: size patches and foreign inputs.

After a pass inserts a token-reduction op, `apply_size_patches` rewrites the
sizes `trace_token_axes` found (`reshape(x, [2, 50, 64])` ->
`reshape(x, [2, sym_size(merged, 1), 64])`), so the graph is generic in the
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

import operator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx import Node

from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph
from fxpress.analysis.token_flow import ForeignInput, TokenFlow, shape_of

aten = torch.ops.aten


def count_value(graph: Graph, counts: dict[int, Node], segment: int, offset: int, before: Node) -> Any:
    """The segment's token count (+ offset) as a value usable in `before`'s arguments."""
    if offset == 0:
        return counts[segment]
    with graph.fx.inserting_before(before):
        return graph.fx.call_function(operator.add, (counts[segment], offset))


def apply_size_patches(graph: Graph, flow: TokenFlow, counts: dict[int, Node]) -> int:
    """Replace every recorded token-count literal by the segment's count; return how many."""
    for patch in flow.patches:
        value = count_value(graph, counts, patch.segment, patch.offset, patch.node)
        args = list(patch.node.args)
        if patch.item is None:
            args[patch.arg] = value
        else:
            sizes = list(args[patch.arg])
            sizes[patch.item] = value
            args[patch.arg] = sizes
        patch.node.args = tuple(args)
    return len(flow.patches)


def _reaches_input(node: Node, *, through_shapes: bool) -> bool:
    """Whether `node` reads a placeholder (ignoring shape reads when `through_shapes` is False)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return True
        if current.target == aten.sym_size.int and not through_shapes:
            continue
        stack.extend(current.all_input_nodes)
    return False


def foreign_values(graph: Graph, flow: TokenFlow) -> dict[Node, torch.Tensor]:
    """Values of the foreign tensors on the example inputs (run before the graph is rewritten)."""
    wanted = {f.tensor for f in flow.foreign}
    if not wanted:
        return {}
    interpreter = torch.fx.Interpreter(graph.module, garbage_collect_values=False)
    flat, _ = pytree.tree_flatten(list(graph.example_inputs))
    with torch.no_grad():
        interpreter.run(*flat)
    return {node: interpreter.env[node] for node in wanted}


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


def _slice_prefix(graph: Graph, item: ForeignInput, counts: dict[int, Node]) -> str:
    value: Any = item.tensor
    with graph.fx.inserting_before(item.user):
        for axis in item.axes:
            value = graph.fx.call_function(aten.slice.Tensor, (value, axis, 0, counts[item.segment]))
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


def resolve_foreign_inputs(graph: Graph, flow: TokenFlow, counts: dict[int, Node],
                           values: dict[Node, torch.Tensor], *, prefix_slice: bool) -> list[str]:
    """Slice, drop or reject every foreign input (see the module doc); describe what was done."""
    done = []
    for item in flow.foreign:
        if prefix_slice and not _reaches_input(item.tensor, through_shapes=True):
            done.append(_slice_prefix(graph, item, counts))
        elif not _reaches_input(item.tensor, through_shapes=False) and \
                _neutral_for(item.user, item.arg, values[item.tensor]):
            done.append(_drop_neutral(graph, item, flow))
        else:
            raise _foreign_error(item, flow, "it reads the input data or is not neutral, so it cannot be resized")
    for tensor in {item.tensor for item in flow.foreign}:
        erase_if_dead(graph, tensor)
    return done


def erase_if_dead(graph: Graph, node: Node) -> None:
    """Erase `node` and then its inputs while they are unused call_function nodes."""
    stack, erased = [node], set()
    while stack:
        current = stack.pop()
        if current in erased or current.users or current.op != "call_function" or current.is_impure():
            continue
        inputs = current.all_input_nodes
        graph.fx.erase_node(current)
        erased.add(current)
        stack.extend(inputs)
