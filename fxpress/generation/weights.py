"""Generate with the weights a pipeline left in a graph: `with_graph_weights(lm, graph)`.

Generation runs its own graphs (the prefill and the explicit-cache decode step, see
:mod:`fxpress.generation.decoder`) built from the Hugging Face modules, so a compressed graph of the
same model hands its weights back to a copy of the modules:

- every float tensor the graph reads replaces the module tensor at the same path (the graph's
  paths carry the capture wrapper's prefix, e.g. ``model.``; the longest suffix that names a module
  tensor wins), so `distill` and `quantized-distill`'s trained norms and biases come along;
- every linear or embedding the graph holds as ``fxpress::quantized_linear`` /
  ``quantized_embedding`` becomes a module calling that op with the graph's packed planes, so the
  decode step captures the op and a TVM target runs the codes (``backends/tvm/quant_rules.py``).

Only passes that keep the architecture can be handed back: a module tensor the graph no longer
reads (`remove-layers`, `prune-width`, `share-weights` rewrote the model) is an error that says so.
The LM passed in is never modified.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fxpress.errors import FxpressError
from fxpress.ops.quant import QUANTIZED_EMBEDDING, QUANTIZED_LINEAR

_PLANES = ("codes", "scales", "zeros", "codebook")


class GraphWeightsError(FxpressError):
    """The graph's weights do not map back onto the model's modules."""


class PackedLinear(nn.Module):
    """``fxpress::quantized_linear(x, codes, scales, zeros, codebook, bias, bits, group)`` as a module."""

    def __init__(self, planes: dict[str, Tensor | None], bias: Tensor | None, bits: int, group: int):
        super().__init__()
        for name in _PLANES:
            self.register_buffer(name, planes.get(name))
        self.register_buffer("bias", bias)
        self.bits, self.group = bits, group

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.fxpress.quantized_linear(x, self.codes, self.scales, self.zeros, self.codebook, self.bias,
                                                  self.bits, self.group)


class PackedEmbedding(nn.Module):
    """``fxpress::quantized_embedding(indices, codes, scales, zeros, codebook, bits, group, dim)`` as a module."""

    def __init__(self, planes: dict[str, Tensor | None], bits: int, group: int, dim: int):
        super().__init__()
        for name in _PLANES:
            self.register_buffer(name, planes.get(name))
        self.bits, self.group, self.dim = bits, group, dim

    def forward(self, indices: Tensor) -> Tensor:
        return torch.ops.fxpress.quantized_embedding(indices, self.codes, self.scales, self.zeros, self.codebook,
                                                     self.bits, self.group, self.dim)


def with_graph_weights(lm: nn.Module, graph) -> nn.Module:
    """A copy of `lm` running the weights of `graph` (a captured and compressed graph of the same
    model; see the module doc)."""
    model = copy.deepcopy(lm)
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    modules = dict(model.named_modules(remove_duplicate=False))
    covered: set[str] = set()
    for node in graph.fx.nodes:
        if node.op != "call_function" or node.target not in (QUANTIZED_LINEAR, QUANTIZED_EMBEDDING):
            continue
        planes = {name: _attr(graph, arg) for name, arg in zip(_PLANES, node.args[1:5])}
        owner = _module_path(graph, node.args[1], modules)
        if node.target == QUANTIZED_LINEAR:
            bias = _attr(graph, node.args[5])
            replacement = PackedLinear(planes, bias, int(node.args[6]), int(node.args[7]))
        else:
            replacement = PackedEmbedding(planes, int(node.args[5]), int(node.args[6]), int(node.args[7]))
        _replace(model, owner, replacement)
        covered.update(f"{owner}.{leaf}" for leaf in ("weight", "bias"))
    copied: set[int] = set()
    for path, value in graph.referenced_tensors().items():
        name = _suffix_in(path, tensors)
        if name is None or name in covered or not value.is_floating_point():
            continue
        target = tensors[name]
        if target.shape != value.shape:
            raise GraphWeightsError(f"graph tensor {path} has shape {tuple(value.shape)} but the model's {name} "
                                    f"has {tuple(target.shape)}: {_CHANGED}")
        with torch.no_grad():
            target.copy_(value.detach())
        copied.add(id(target))
    packed = {id(t) for m in model.modules() if isinstance(m, (PackedLinear, PackedEmbedding)) for t in m.buffers()}
    missing = [name for name, tensor in [*model.named_parameters(remove_duplicate=False),
                                         *model.named_buffers(remove_duplicate=False)]
               if id(tensor) not in copied | packed and not name.endswith("inv_freq")]
    if missing:
        raise GraphWeightsError(f"the graph no longer reads {len(missing)} model tensors (first: {missing[0]}): "
                                f"{_CHANGED}")
    return model


_CHANGED = ("the pipeline changed the architecture; generation hands back only the weights of the same modules "
            "(quantize, quantized-distill, diff-quant, distill); export the compressed model with "
            "`fxpress run MODEL --pipeline ... --export-hf DIR` and generate from that folder")


def _attr(graph, arg) -> Tensor | None:
    return None if arg is None else graph.attribute(arg.target)


def _module_path(graph, codes_arg, modules: dict[str, nn.Module]) -> str:
    """The model's module path of a packed layer, from its codes' attribute path (``...<leaf>_codes``)."""
    path = codes_arg.target
    owner, _, leaf = path.rpartition(".")
    stem = leaf[:-len("_codes")] if leaf.endswith("_codes") else leaf
    found = _suffix_in(owner, modules)
    if found is None or stem not in ("weight",):
        raise GraphWeightsError(f"packed planes {path} name no module of the model (expected <module>.weight_codes)")
    return found


def _suffix_in(path: str, names: dict) -> str | None:
    """The longest dotted suffix of `path` that is a key of `names` (the capture wrapper's prefix dropped)."""
    parts = path.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in names:
            return candidate
    return None


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, module)
