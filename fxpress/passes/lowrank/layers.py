"""The layers low-rank can factorize: float linears (linear / addmm / mm on a weight attribute) and
groups-1 conv2d, each seen as an (out, in) matrix (a conv's in = in_channels * kh * kw).

A tensor read by several nodes (weights shared by `share-weights`) is one layer, factorized once for
all of its uses; a tensor an embedding also reads (a tied head) is left alone, as are the factors a
previous low-rank made.  Both factorized forms cost rank * (in + out) MACs per output row or pixel
against in * out dense, which is what `min_gain` is measured on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Node

from fxpress.ir.builder import origin
from fxpress.ir.graph import Graph
from fxpress.passes.quant.layers import operands, weight_uses

aten = torch.ops.aten
ConvArgs = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # stride, padding, dilation


@dataclass(frozen=True)
class Use:
    """One node reading the layer's weight: its input, bias and (conv) geometry."""

    node: str
    x: str
    bias: Node | None
    weight_arg: Node  # the get_attr (or transpose of it) passed as the weight
    conv: ConvArgs | None = None


@dataclass
class Layer:
    """One weight tensor to factorize and the nodes reading it."""

    name: str  # module path of the first use
    path: str  # attribute path of the weight
    kind: str  # "linear" or "conv2d"
    transposed: bool  # a linear weight stored (in, out) (mm / addmm)
    shape: tuple[int, ...]  # the attribute's shape
    uses: list[Use] = field(default_factory=list)

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the matrix view: K of a linear, in_channels * kh * kw of a conv."""
        if self.kind == "conv2d":
            return self.shape[1] * self.shape[2] * self.shape[3]
        return self.shape[0] if self.transposed else self.shape[1]

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def cost_ratio(self, rank: int) -> float:
        """MACs (and weight params) factorized / dense: rank * (in + out) / (in * out)."""
        return rank * (self.in_features + self.out_features) / (self.in_features * self.out_features)

    def matrix(self, graph: Graph) -> torch.Tensor:
        """The float32 (out, in) weight matrix."""
        weight = graph.attribute(self.path).detach().float()
        return weight.t() if self.transposed else weight.reshape(self.out_features, -1)

    def stat_keys(self) -> list[tuple]:
        """Keys of the input statistics this layer needs (shared by layers reading the same input)."""
        return list(dict.fromkeys((use.x, self.kernel, use.conv) for use in self.uses))

    @property
    def kernel(self) -> tuple[int, int] | None:
        return (self.shape[2], self.shape[3]) if self.kind == "conv2d" else None


def input_rows(value: torch.Tensor, kernel: tuple[int, int] | None, conv: ConvArgs | None) -> torch.Tensor:
    """A layer input as rows of the matrix view's columns: (rows, in) (im2col patches for a conv)."""
    if kernel is None:
        return value.reshape(-1, value.shape[-1])
    stride, padding, dilation = conv
    patches = F.unfold(value, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _pair(value: object) -> tuple[int, int]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return int(items[0]), int(items[-1])


def conv_geometry(node: Node) -> tuple[ConvArgs | None, int]:
    """((stride, padding, dilation), groups) of an aten.conv2d node; None for string padding."""
    args = list(node.args) + [None, 1, 0, 1, 1][len(node.args) - 2:]
    names = ("bias", "stride", "padding", "dilation", "groups")
    values = {k: node.kwargs.get(k, args[2 + i]) for i, k in enumerate(names)}
    if isinstance(values["padding"], str):
        return None, int(values["groups"])
    return (_pair(values["stride"]), _pair(values["padding"]), _pair(values["dilation"])), int(values["groups"])


def _conv_use(graph: Graph, node: Node) -> tuple[str, Use] | None:
    """(weight path, use) of a groups-1 conv2d on a 4-D float weight attribute, else None."""
    if node.op != "call_function" or node.target != aten.conv2d.default or not isinstance(node.args[0], Node):
        return None
    weight = node.args[1]
    if not isinstance(weight, Node) or weight.op != "get_attr":
        return None
    value = graph.attribute(str(weight.target))
    conv, groups = conv_geometry(node)
    if conv is None or groups != 1 or not isinstance(value, torch.Tensor) or value.dim() != 4 or \
            not value.is_floating_point():
        return None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return str(weight.target), Use(node.name, node.args[0].name, bias, weight, conv)


def find_layers(graph: Graph, *, head: bool) -> tuple[list[Layer], dict[str, str]]:
    """(layers that can be factorized, {module path: why not} for those that cannot)."""
    uses = weight_uses(graph)
    heads = output_linears(graph, {use.node for use in uses if use.kind == "linear"})
    embedded = {id(graph.attribute(use.path)) for use in uses if use.kind == "embedding"}
    nodes = {node.name: node for node in graph.fx.nodes}
    found: dict[int, Layer] = {}
    left: dict[str, str] = {}
    for use in (u for u in uses if u.kind == "linear"):
        node, key = nodes[use.node], id(graph.attribute(use.path))
        reason = _left_out(node, key, embedded, heads, head)
        if reason:
            left[use.module] = reason
            continue
        _add(found, left, graph, key, use.path, "linear", use.transposed, use.module,
             Use(use.node, use.x, operands(node)[1], use.weight_arg))
    for node in graph.fx.nodes:
        conv = _conv_use(graph, node)
        if conv is None:
            continue
        path, use = conv
        module = graph.info(node).module_path
        if origin(node) and origin(node)["pass"] == "low-rank":
            left[module] = "already factorized"
            continue
        _add(found, left, graph, id(graph.attribute(path)), path, "conv2d", False, module, use)
    order = {node.name: index for index, node in enumerate(graph.fx.nodes)}
    layers = [layer for layer in found.values() if layer.name not in left]
    return sorted(layers, key=lambda layer: order[layer.uses[0].node]), left


def output_linears(graph: Graph, linears: set[str]) -> set[str]:
    """The linears computing an output through single-input ops only (norms, casts, views, slices): the
    model's head.  A residual add stops the walk, so an encoder's last projections are not heads."""
    found, stack, seen = set(), [n for n in graph.fx.nodes if n.op == "output"], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.name in linears:
            found.add(node.name)
            continue
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
        if node.op == "output" or len(inputs) == 1:
            stack.extend(inputs)
    return found


def _left_out(node: Node, key: int, embedded: set[int], heads: set[str], head: bool) -> str | None:
    if origin(node) and origin(node)["pass"] == "low-rank":
        return "already factorized"
    if key in embedded:
        return "tied to an embedding table"
    if node.name in heads and not head:
        return "the head (set head=true to factorize it)"
    return None


def _add(found: dict[int, Layer], left: dict[str, str], graph: Graph, key: int, path: str, kind: str,
         transposed: bool, module: str, use: Use) -> None:
    layer = found.get(key)
    if layer is None:
        found[key] = Layer(module or path, path, kind, transposed, tuple(graph.attribute(path).shape), [use])
    elif (layer.kind, layer.transposed) != (kind, transposed):
        left[layer.name] = f"its weight is read both as a {layer.kind} and as a {kind}"
    else:
        layer.uses.append(use)
