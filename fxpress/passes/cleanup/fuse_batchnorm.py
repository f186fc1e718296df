"""batch-norm fusion: batch_norm(conv(x, W, b)) -> conv(x, W', b'), and the same for linear.

With s = gamma / sqrt(running_var + eps) per output channel,
W' = W * s and b' = (b - running_mean) * s + beta; a conv or linear
without a bias gets one.  Matched on both capture methods:

- export graphs: `aten.conv1d/conv2d/conv3d` (`.default` or `.padding`),
  `aten.convolution` (not transposed) or `aten.linear`, followed by
  `aten.batch_norm` with training=False (what torch.export gives for an
  eval-mode BatchNorm) or `aten._native_batch_norm_legit_no_training`
  (what it gives after `run_decompositions()`);
- symbolic_trace graphs: call_module Conv1d/2d/3d -> BatchNorm1d/2d/3d,
  Linear -> BatchNorm1d, with the BatchNorm in eval mode.

Fused only when the conv/linear output has no other user, the BatchNorm
uses running statistics, and for linear the output is 2-D (a BatchNorm1d
on (N, C, L) normalises a different dim than linear's features).  The
fused weights are new Parameters: `<conv>.weight_fused` / `.bias_fused` on
export graphs; on traced graphs a new conv module at the same path, or at
`<conv>_fused` when other nodes still call or read the old one.  The
user's tensors are never written.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from fxpress.ir.builder import Builder
from fxpress.ir.graph import Graph
from fxpress.ir.rewrite import add_tensor, fresh_leaf
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass

aten = torch.ops.aten

_CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
             aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default}
_LINEAR_OPS = {aten.linear.default}
# BatchNorm op -> (index of its `training` argument or None, index of eps)
_BN_OPS = {aten.batch_norm.default: (5, 7), aten._native_batch_norm_legit_no_training.default: (None, 6)}
_CONV_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_BN_MODULES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


@dataclass
class BatchNormStats:
    """The eval-mode BatchNorm folded into the preceding layer."""

    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


@dataclass
class FusionMatch:
    """One conv/linear -> BatchNorm pair, by node name (so it applies to a copy)."""

    layer: str  # the conv/linear node
    norm: str  # the BatchNorm node
    result: str  # the node whose value is the BatchNorm's output (a getitem for the legit op)
    layer_path: str
    norm_path: str
    stats: BatchNormStats

    @property
    def label(self) -> str:
        return f"{self.layer_path} + {self.norm_path}"


@register_pass
@dataclass(frozen=True)
class FuseBatchNorm(Pass):
    """batch_norm(conv(x, W, b)) -> conv(x, W', b'); batch_norm(linear(x)) -> linear'(x)."""

    name: ClassVar[str] = "fuse-batchnorm"
    preserves_semantics: ClassVar[bool] = True

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not find_fusions(graph):
            return PassResult(graph, modified=False, stats={
                "fused_pairs": [], "removed_nodes": 0,
                "reason": "no inference batch norm reading a conv or linear output alone"})
        new = graph.copy()
        before = new.num_nodes
        matches = find_fusions(new)
        for match in matches:
            _fuse(new, match)
        new.remove_unused_attributes()
        new.recompile()
        return PassResult(new, modified=True, stats={"fused_pairs": [m.label for m in matches],
                                                     "removed_nodes": before - new.num_nodes})


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   stats: BatchNormStats) -> tuple[torch.Tensor, torch.Tensor]:
    """New (W', b') for a layer whose output channels are dim 0 of `weight`, computed in float64."""
    with torch.no_grad():
        scale = torch.rsqrt(stats.var.double() + stats.eps)
        if stats.gamma is not None:
            scale = scale * stats.gamma.double()
        shift = -stats.mean.double() * scale
        if bias is not None:
            shift = shift + bias.double() * scale
        if stats.beta is not None:
            shift = shift + stats.beta.double()
        new_weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        return new_weight.to(weight.dtype), shift.to(weight.dtype)


def find_fusions(graph: Graph) -> list[FusionMatch]:
    """Every fusable conv/linear -> BatchNorm pair, in graph order."""
    matches = []
    for node in graph.fx.nodes:
        if node.op == "call_function" and node.target in _BN_OPS:
            match = _match_export(graph, node)
        elif node.op == "call_module" and isinstance(graph.attribute(str(node.target)), _BN_MODULES):
            match = _match_traced(graph, node)
        else:
            match = None
        if match is not None:
            matches.append(match)
    return matches


# -- export graphs --------------------------------------------------------------------------
def _attr(graph: Graph, arg: object) -> torch.Tensor | None:
    """The tensor a get_attr argument reads; None for anything else."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        value = graph.attribute(str(arg.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _owner(node: torch.fx.Node) -> str:
    return str(node.target).rpartition(".")[0]


def _bias_arg(node: torch.fx.Node) -> object:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _export_layer(graph: Graph, node: object) -> torch.fx.Node | None:
    """`node` if it is a conv/linear whose weight and bias are attributes and only the BN reads it."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or len(node.users) != 1:
        return None
    if node.target not in _CONV_OPS and node.target not in _LINEAR_OPS:
        return None
    if node.target == aten.convolution.default and node.args[6]:  # transposed
        return None
    weight = _attr(graph, node.args[1])
    if weight is None or not weight.is_floating_point():
        return None
    bias = _bias_arg(node)
    if bias is not None and _attr(graph, bias) is None:
        return None
    if node.target in _LINEAR_OPS and len(graph.info(node).shape or ()) != 2:
        return None
    return node


def _bn_result(norm: torch.fx.Node) -> torch.fx.Node | None:
    """The node carrying the normalised tensor: the BN itself, or the legit op's only getitem(0)."""
    if norm.target == aten.batch_norm.default:
        return norm
    firsts = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 0]
    others = [u for u in norm.users if u not in firsts]
    if len(firsts) != 1 or any(u.target is not operator.getitem or u.users for u in others):
        return None
    return firsts[0]


def _match_export(graph: Graph, norm: torch.fx.Node) -> FusionMatch | None:
    training_index, eps_index = _BN_OPS[norm.target]
    if training_index is not None and norm.args[training_index] is not False:
        return None
    layer = _export_layer(graph, norm.args[0])
    result = _bn_result(norm)
    mean, var = _attr(graph, norm.args[3]), _attr(graph, norm.args[4])
    if layer is None or result is None or mean is None or var is None:
        return None
    gamma_arg, beta_arg = norm.args[1], norm.args[2]
    gamma, beta = _attr(graph, gamma_arg), _attr(graph, beta_arg)
    if (gamma_arg is not None and gamma is None) or (beta_arg is not None and beta is None):
        return None
    if _attr(graph, layer.args[1]).shape[0] != mean.numel():
        return None
    stats = BatchNormStats(gamma, beta, mean, var, float(norm.args[eps_index]))
    return FusionMatch(layer.name, norm.name, result.name, _owner(layer.args[1]), _owner(norm.args[3]), stats)


def _fuse_export(graph: Graph, match: FusionMatch, nodes: dict[str, torch.fx.Node]) -> None:
    layer = nodes[match.layer]
    weight_node, bias_node = layer.args[1], _bias_arg(layer)
    weight = _attr(graph, weight_node)
    new_weight, new_bias = fold_batchnorm(weight, _attr(graph, bias_node), match.stats)
    grad = weight.requires_grad
    weight_path = add_tensor(graph, match.layer_path, "weight_fused", new_weight, parameter=True, requires_grad=grad)
    bias_path = add_tensor(graph, match.layer_path, "bias_fused", new_bias, parameter=True, requires_grad=grad)
    with Builder(graph, FuseBatchNorm.name).before(layer) as at:
        args = list(layer.args) + [None] * max(0, 3 - len(layer.args))
        args[1], args[2] = at.get_attr(weight_path), at.get_attr(bias_path)
    layer.args = tuple(args)
    layer.kwargs = {k: v for k, v in layer.kwargs.items() if k != "bias"}
    nodes[match.result].replace_all_uses_with(layer)
    norm = nodes[match.norm]
    stale = [weight_node, bias_node] + list(norm.args[1:5])
    for user in list(norm.users):
        graph.fx.erase_node(user)
    graph.fx.erase_node(norm)
    _erase_unread_attributes(graph, stale, match.norm_path)


def _erase_unread_attributes(graph: Graph, stale: list, norm_path: str) -> None:
    """Erase get_attr nodes left without users: the old weights and the BatchNorm's tensors."""
    prefix = norm_path + "." if norm_path else None
    for node in list(graph.fx.nodes):
        if node.op != "get_attr" or node.users:
            continue
        if node in stale or (prefix and str(node.target).startswith(prefix)):
            graph.fx.erase_node(node)


# -- symbolic_trace graphs -----------------------------------------------------------------------
def _match_traced(graph: Graph, norm: torch.fx.Node) -> FusionMatch | None:
    bn = graph.attribute(str(norm.target))
    if bn.training or not bn.track_running_stats or bn.running_mean is None:
        return None
    layer = norm.args[0] if len(norm.args) == 1 and not norm.kwargs else None
    if not isinstance(layer, torch.fx.Node) or layer.op != "call_module" or len(layer.users) != 1:
        return None
    module = graph.attribute(str(layer.target))
    if type(module) not in _CONV_MODULES + (torch.nn.Linear,) or not module.weight.is_floating_point():
        return None
    if isinstance(module, torch.nn.Linear) and (type(bn) is not torch.nn.BatchNorm1d
                                                or len(graph.info(layer).shape or ()) != 2):
        return None
    if module.weight.shape[0] != bn.num_features:
        return None
    stats = BatchNormStats(bn.weight if bn.affine else None, bn.bias if bn.affine else None,
                           bn.running_mean, bn.running_var, float(bn.eps))
    return FusionMatch(layer.name, norm.name, norm.name, str(layer.target), str(norm.target), stats)


def _fuse_traced(graph: Graph, match: FusionMatch, nodes: dict[str, torch.fx.Node]) -> None:
    module = graph.attribute(match.layer_path)
    new_weight, new_bias = fold_batchnorm(module.weight, module.bias, match.stats)
    shared = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    fused = copy.deepcopy(module, shared)  # a new module object; its old tensors stay shared
    fused.weight = torch.nn.Parameter(new_weight, requires_grad=module.weight.requires_grad)
    fused.bias = torch.nn.Parameter(new_bias, requires_grad=module.weight.requires_grad)
    owner_path, _, leaf = match.layer_path.rpartition(".")
    owner = graph.module.get_submodule(owner_path) if owner_path else graph.module
    layer = nodes[match.layer]
    if _read_elsewhere(graph, layer):  # keep the old module for its other readers
        leaf = fresh_leaf(owner, f"{leaf}_fused")
        layer.target = f"{owner_path}.{leaf}" if owner_path else leaf
    setattr(owner, leaf, fused)
    norm = nodes[match.norm]
    norm.replace_all_uses_with(nodes[match.layer])
    graph.fx.erase_node(norm)


def _read_elsewhere(graph: Graph, layer: torch.fx.Node) -> bool:
    """Whether another node calls the layer's module or reads one of its tensors."""
    prefix = f"{layer.target}."
    return any((n.op == "call_module" and n.target == layer.target and n is not layer)
               or (n.op == "get_attr" and str(n.target).startswith(prefix)) for n in graph.fx.nodes)


def _fuse(graph: Graph, match: FusionMatch) -> None:
    nodes = {node.name: node for node in graph.fx.nodes}
    if nodes[match.layer].op == "call_module":
        _fuse_traced(graph, match, nodes)
    else:
        _fuse_export(graph, match, nodes)
