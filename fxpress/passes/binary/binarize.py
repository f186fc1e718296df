"""binarize: conv2d / linear -> fxpress.binary_conv2d / binary_linear (sign of weights and inputs).

Two kinds of layer become binary ops (see `fxpress.ops.binary`):

- layers that already compute on signs, recognised by pattern (exact):
  a `aten.conv2d` (groups 1) or `aten.linear` whose input is
  `where(ge(x, 0), 1.0, -1.0)` (optionally through `to.dtype`) and whose
  weight is the same pattern on a parameter, or a buffer holding only
  +-1 (a folded one); a following `mul` by a per-channel constant becomes
  the op's `scale` and a following `add` of a per-channel constant its
  `bias`.  This is what torch.export gives for `BinaryConv2d` /
  `BinaryLinear` (bnn-digits), whatever the module is called;
- float layers chosen by `layers` (lossy): module paths, by default every
  conv2d / linear but the first and the last in graph order (they stay
  float, as in XNOR-Net).  Their weight stays the latent float parameter;
  with `scale=channel` the op is scaled by alpha = mean |W| per output
  channel (computed in the graph, so it trains with W); the layer's bias
  is added after scaling.

The ops' backward is the straight-through estimator, so the graph can be
fine-tuned (`graph.module.train()` and an optimizer over its parameters).
Only export graphs (ATen ops) are matched.  Grouped and transposed
convolutions, conv1d/3d and non-float weights are left alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx

from fxpress.errors import PreconditionError
from fxpress.ir.builder import Builder, Inserter
from fxpress.ir.graph import Graph
from fxpress.ir.rewrite import constant_nodes, erase_dead
from fxpress.ops.binary import BINARY_OPS, TRAINABLE_OPS, ops
from fxpress.ops.quant import QUANTIZED_OPS
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass

aten = torch.ops.aten
ASSERTS = {aten._assert_tensor_metadata.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.clone.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default}
_LAYER_OPS = {aten.conv2d.default: "conv2d", aten.linear.default: "linear"}


# -- graph helpers shared by the binary passes and the native lowering ----------------------
def sign_source(node: object) -> torch.fx.Node | None:
    """x if `node` computes where(x >= 0, 1, -1) (through casts), else None."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.target == aten.where.Scalar):
        return None
    cond, high, low = node.args[:3]
    if (high, low) != (1.0, -1.0) or not isinstance(cond, torch.fx.Node) or cond.target != aten.ge.Scalar:
        return None
    return cond.args[0] if cond.args[1] == 0 and isinstance(cond.args[0], torch.fx.Node) else None


# -- matching ---------------------------------------------------------------------------------
@dataclass
class BinaryLayer:
    """A conv2d / linear layer, by node name (so it applies to a copy of the graph)."""

    kind: str  # "conv2d" or "linear"
    path: str  # owning module path
    state: str  # "float", "binary" (sign pattern in ATen ops) or "op" (already an fxpress op)
    layer: str
    output: str = ""  # node whose value the binary op replaces
    x: str = ""
    weight: str = ""
    scale: str | None = None
    bias: str | None = None
    conv: tuple[tuple[int, ...], ...] = ()  # stride, padding, dilation


def _pair(value: object) -> tuple[int, int]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return (int(items[0]), int(items[-1]))


def _conv_args(node: torch.fx.Node) -> tuple[tuple, int]:
    """((stride, padding, dilation), groups) of an aten.conv2d node."""
    args = list(node.args) + [None, 1, 0, 1, 1][len(node.args) - 2:]
    names = ("bias", "stride", "padding", "dilation", "groups")
    values = {k: node.kwargs.get(k, args[2 + i]) for i, k in enumerate(names)}
    if isinstance(values["padding"], str):
        return (), -1
    return tuple(_pair(values[k]) for k in names[1:4]), int(values["groups"])


def _per_channel(graph: Graph, node: object, channels: int, kind: str, constant: set) -> bool:
    if not isinstance(node, torch.fx.Node) or node not in constant:
        return False
    shape = tuple(graph.info(node).shape or ())
    wanted = {(channels,), (1, channels)} if kind == "linear" else {(channels, 1, 1), (1, channels, 1, 1)}
    return shape in wanted


def _binary_weight(graph: Graph, node: object) -> torch.fx.Node | None:
    """The parameter behind a binary weight: sign(param), or a get_attr holding only +-1."""
    source = sign_source(node)
    if isinstance(source, torch.fx.Node) and source.op == "get_attr":
        return source
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = graph.attribute(str(node.target))
        if isinstance(value, torch.Tensor) and value.is_floating_point() and bool((value.abs() == 1).all()):
            return node
    return None


def _single_user(node: torch.fx.Node, target) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].target == target else None


def _absorb_affine(graph: Graph, match: BinaryLayer, node: torch.fx.Node, channels: int, constant: set) -> None:
    """Fold a following `* scale` and `+ bias` (per-channel constants) into the match."""
    mul = _single_user(node, aten.mul.Tensor)
    if mul is not None and match.bias is None:
        other = mul.args[1] if mul.args[0] is node else mul.args[0]
        if _per_channel(graph, other, channels, match.kind, constant):
            match.scale, match.output, node = other.name, mul.name, mul
    add = _single_user(node, aten.add.Tensor)
    if add is not None and match.bias is None and add.args[0] is node and len(add.args) == 2 \
            and _per_channel(graph, add.args[1], channels, match.kind, constant):
        match.bias, match.output = add.args[1].name, add.name


def _match_layer(graph: Graph, node: torch.fx.Node, constant: set) -> BinaryLayer | None:
    kind = _LAYER_OPS[node.target]
    conv, groups = _conv_args(node) if kind == "conv2d" else ((), 1)
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if groups != 1 or (bias is not None and bias not in constant):
        return None
    path = graph.info(node).module_path
    match = BinaryLayer(kind, path, "float", node.name, node.name, node.args[0].name, "",
                        None, bias.name if bias is not None else None, conv)
    x, weight = sign_source(node.args[0]), _binary_weight(graph, node.args[1])
    if x is not None and weight is not None:
        match.state, match.x, match.weight = "binary", x.name, weight.name
        _absorb_affine(graph, match, node, graph.info(node).shape[1 if kind == "conv2d" else -1], constant)
        return match
    weight_node = node.args[1]
    if not (isinstance(weight_node, torch.fx.Node) and weight_node.op == "get_attr"):
        return None
    value = graph.attribute(str(weight_node.target))
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    match.weight = weight_node.name
    return match


def find_layers(graph: Graph) -> list[BinaryLayer]:
    """Every conv2d / linear layer and binary op, in graph order."""
    constant, found = constant_nodes(graph), []
    for node in graph.fx.nodes:
        if node.op != "call_function":
            continue
        if node.target in BINARY_OPS:
            kind = "linear" if "linear" in str(node.target) else "conv2d"
            found.append(BinaryLayer(kind, graph.info(node).module_path, "op", node.name))
        elif node.target in _LAYER_OPS:
            match = _match_layer(graph, node, constant)
            if match is not None:
                found.append(match)
    return found


def select_layers(layers: list[BinaryLayer], paths: tuple[str, ...], keep_first_last: bool,
                  pass_name: str) -> list[BinaryLayer]:
    """The layers to rewrite: every sign-pattern layer, plus the float ones chosen by `paths`."""
    if paths:
        known = {layer.path for layer in layers}
        missing = [p for p in paths if p not in known]
        if missing:
            raise PreconditionError(f"no conv2d/linear layer at {', '.join(missing)}; layers in this graph: "
                                    f"{', '.join(sorted(known)) or 'none'}", pass_name)
        chosen = [layer for layer in layers if layer.path in paths and layer.state == "float"]
    else:
        inner = layers[1:-1] if keep_first_last else layers
        chosen = [layer for layer in inner if layer.state == "float"]
    return [layer for layer in layers if layer.state == "binary" or layer in chosen]


def _channel_vector(graph: Graph, at: Inserter, node: torch.fx.Node | None, channels: int) -> torch.fx.Node | None:
    """`node` as a (C,) tensor: itself, the 1-D tensor it views, or a new reshape of it."""
    if node is None or tuple(graph.info(node).shape or ()) == (channels,):
        return node
    if node.target in _VIEWS and tuple(graph.info(node.args[0]).shape or ()) == (channels,):
        return node.args[0]
    return at.call(aten.reshape.default, node, [channels])


def _alpha(at: Inserter, weight: torch.fx.Node) -> torch.fx.Node:
    """alpha = mean |W| per output channel, as graph nodes (it trains with W)."""
    magnitude = at.call(aten.abs.default, weight)
    flat = at.call(aten.flatten.using_ints, magnitude, 1)
    return at.call(aten.mean.dim, flat, [1])


def rewrite_layer(graph: Graph, layer: BinaryLayer, scale: str, renamed: dict[str, str] | None = None) -> str:
    """Replace one matched layer (in `graph`, found by node names) with its binary op; returns the op's
    name.  `renamed` maps the outputs of layers rewritten before to their ops, so a layer whose input
    is another rewritten layer's output (a factorized linear's second half) still finds it."""
    nodes = {node.name: node for node in graph.fx.nodes}
    for old, new in (renamed or {}).items():
        nodes.setdefault(old, nodes.get(new))
    output, conv_node = nodes[layer.output], nodes[layer.layer]
    weight = nodes[layer.weight]
    channels = graph.attribute(str(weight.target)).shape[0]
    with Builder(graph, Binarize.name).before(output, like=conv_node) as at:
        if layer.state == "float":
            alpha = _alpha(at, weight) if scale == "channel" else None
        else:
            alpha = _channel_vector(graph, at, nodes.get(layer.scale), channels)
        bias = _channel_vector(graph, at, nodes.get(layer.bias), channels)
        args = (nodes[layer.x], weight, alpha, bias)
        if layer.kind == "conv2d":
            args += tuple(list(v) for v in layer.conv)
            target = ops.binary_conv2d.default
        else:
            target = ops.binary_linear.default
        op = at.call(target, *args, name=target.overloadpacket.__name__)
    output.replace_all_uses_with(op)
    erase_dead(graph, [output])
    return op.name


@register_pass
@dataclass(frozen=True)
class Binarize(Pass):
    """conv2d(x, W) -> binary_conv2d(x, W, alpha) = conv2d(sign x, sign W) * alpha; linear alike."""

    name: ClassVar[str] = "binarize"
    creates: ClassVar[tuple] = TRAINABLE_OPS
    preserves_semantics: ClassVar[bool] = False  # float layers change; sign-pattern layers stay exact

    layers: tuple[str, ...] = ()  # module paths of float layers to binarize; default: all but first/last
    scale: Literal["channel", "none"] = "channel"  # XNOR-Net alpha = mean|W| per output channel
    keep_first_last: bool = True  # with no `layers`, keep the first and last layer float

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        found = find_layers(graph)
        chosen = select_layers(found, self.layers, self.keep_first_last, self.name)
        if not chosen:
            quantized = [node for node in graph.fx.nodes if node.target in QUANTIZED_OPS]
            if quantized:
                raise PreconditionError(f"no float linear/conv2d layer left to binarize: {len(quantized)} layers are "
                                        f"quantized ({quantized[0].format_node()}); binarize needs float weights, so "
                                        "run it before quantize", self.name)
            states = {state: sum(f.state == state for f in found) for state in ("float", "binary", "op")}
            reason = (f"no float linear/conv2d layer left to binarize ({states['op']} already binary ops, "
                      f"{states['float']} float layers kept by keep_first_last)" if found else
                      "no linear or conv2d layer with constant weights")
            return PassResult(graph, modified=False, stats={"recognized": [], "binarized": [], "reason": reason})
        new = graph.copy()
        before = new.num_nodes
        renamed: dict[str, str] = {}
        for layer in chosen:
            renamed[layer.output] = rewrite_layer(new, layer, self.scale, renamed)
        new.remove_unused_attributes()
        new.recompile()
        kept = [layer.path for layer in find_layers(new) if layer.state == "float"]
        return PassResult(new, modified=True, stats={
            "recognized": [layer.path for layer in chosen if layer.state == "binary"],
            "binarized": [layer.path for layer in chosen if layer.state == "float"],
            "kept_float": kept, "removed_nodes": before - new.num_nodes})
