"""The weights `quantize` can pack: linears as captured (aten.linear, addmm / mm with a weight attribute),
embeddings, and which linears are the model's head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from fxpress.ir.graph import Graph
from fxpress.ir.opinfo import op_info

aten = torch.ops.aten
_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default)
_STOPS = ("matmul", "conv", "binary", "attention")  # a path to the output through these leaves the head


@dataclass(frozen=True)
class WeightUse:
    """One node reading a weight attribute as a linear's (N, K) weight or an embedding table."""

    node: str  # the linear / addmm / mm / embedding node
    kind: str  # "linear" or "embedding"
    path: str  # attribute path of the tensor
    transposed: bool  # the attribute is stored (K, N): the weight is its transpose (mm / addmm on it)
    x: str | None  # the linear's input node (None for an embedding)
    bias: Node | None
    weight_arg: Node  # the node passed as the weight (get_attr, or a transpose of it)
    module: str  # module path of the node


def _attr(node: object) -> Node | None:
    """A get_attr node of a 2-D floating tensor, else None."""
    return node if isinstance(node, Node) and node.op == "get_attr" else None


def _float_matrix(graph: Graph, node: Node | None) -> bool:
    if node is None:
        return False
    value = graph.attribute(str(node.target))
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.is_floating_point()


def _transposed_attr(node: object) -> Node | None:
    """The get_attr under `t(W)`, `transpose(W, 0, 1)` or `permute(W, [1, 0])`."""
    if not isinstance(node, Node) or node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    if node.target == aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    if node.target == aten.permute.default and [int(d) % 2 for d in node.args[1]] != [1, 0]:
        return None
    return _attr(node.args[0])


def operands(node: Node) -> tuple[object, object]:
    """(x, bias) of a linear, addmm or mm node."""
    if node.target == aten.linear.default:
        return node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if node.target == aten.addmm.default:
        return node.args[1], node.args[0]
    return node.args[0], None


def match_use(graph: Graph, node: Node) -> WeightUse | None:
    """The weight use `node` is, or None."""
    if node.op != "call_function":
        return None
    module = graph.info(node).module_path
    if node.target == aten.linear.default and isinstance(node.args[0], Node):
        weight = _attr(node.args[1])
        bias = operands(node)[1]
        if _float_matrix(graph, weight):
            return WeightUse(node.name, "linear", str(weight.target), False, node.args[0].name, bias, weight, module)
    elif node.target in (aten.mm.default, aten.addmm.default) and not node.kwargs:
        (x, bias), m2 = operands(node), node.args[-1]
        if not isinstance(x, Node) or len(graph.info(x).shape or ()) != 2:
            return None
        direct, under = _attr(m2), _transposed_attr(m2)
        weight = under if under is not None else direct
        if not _float_matrix(graph, weight):
            return None
        out_features = graph.info(node).shape[-1]
        if bias is not None and not (isinstance(bias, Node) and tuple(graph.info(bias).shape) == (out_features,)):
            return None
        return WeightUse(node.name, "linear", str(weight.target), under is None, x.name, bias, m2, module)
    elif node.target == aten.embedding.default:
        weight = _attr(node.args[0])
        if _float_matrix(graph, weight):
            return WeightUse(node.name, "embedding", str(weight.target), False, None, None, weight, module)
    return None


def weight_uses(graph: Graph) -> list[WeightUse]:
    """Every linear and embedding reading a float weight attribute, in graph order."""
    return [use for node in graph.fx.nodes if (use := match_use(graph, node)) is not None]


def head_nodes(graph: Graph, uses: list[WeightUse]) -> set[str]:
    """Linears the output reaches without passing another matmul, conv or attention, or a residual join:
    the model's head.  An encoder whose output is its last hidden state (post-LN: LayerNorm(x + dense(h)))
    has none; through its residual adds every block's output projection would count as a head."""
    return nearest_linears(graph, uses, from_outputs=True, stops=_STOPS, joins=True)


def is_residual_join(node: Node) -> bool:
    """An add of two tensors (not of a tensor and a number or a size): where a residual stream meets a branch."""
    return node.op == "call_function" and node.target == aten.add.Tensor and \
        sum(isinstance(a, Node) and not is_shape_value(a) for a in node.args[:2]) == 2


def nearest_linears(graph: Graph, uses: list[WeightUse], *, from_outputs: bool,
                    stops: tuple[str, ...], joins: bool = False) -> set[str]:
    """Names of the linear nodes reached from the graph's outputs (walking back) or from its inputs
    (walking forward) without passing an op of a `stops` category (or, with `joins`, a residual join).

    Shape values are not followed: a dynamic capture reads the batch size off the input (`sym_size`),
    and every reshape after it uses that size, so through it the input would "reach" nearly every
    linear (and the output, walking back, every producer of a size)."""
    linears = {use.node for use in uses if use.kind == "linear"}
    found, seen = set(), set()
    stack = [node for node in graph.fx.nodes if node.op == ("output" if from_outputs else "placeholder")]
    while stack:
        node = stack.pop()
        if node in seen or is_shape_value(node):
            continue
        seen.add(node)
        if node.name in linears:
            found.add(node.name)
            continue
        info = op_info(node.target) if node.op == "call_function" else None
        if (info is not None and info.category in stops) or (joins and is_residual_join(node)):
            continue
        stack.extend(node.all_input_nodes if from_outputs else node.users)
    return found


def is_shape_value(node: Node) -> bool:
    """A node computing a size (SymInt, or a Python number from the shapes), not a tensor."""
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))
