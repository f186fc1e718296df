"""Lower a Graph's binary ops to the native kernels: `run_native(graph) -> NativeProgram`.

Every `fxpress.binary_linear` / `binary_conv2d` node becomes a call of a
`NativeBinaryLayer` holding the packed sign bits of its weight (packed
once, here), its scale and bias: dense XNOR-popcount GEMM on bit-packed
activations (im2col for convolutions).  Every `*_mst` node becomes one
that runs the reuse kernel along its plan.  Other nodes run in PyTorch as
before.  Results equal the graph's bit for bit: the kernels produce exact
integers, and scale and bias are applied by the same float ops as the
reference implementations.  Weights, scales and biases must be constants
(attributes or ops on them); activations must be float32.

Every `fxpress::quantized_linear` becomes a `NativeQuantLinear` on the
quantized kernels, or on the op's reference where no kernel fits its
layout (`quant_lowering.py` states the rules; these results are within the
activation-quantization bound of the graph's, not equal).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxpress.backends.native import kernels
from fxpress.backends.native.quant_lowering import QUANT_LINEAR_OPS, NativeQuantLinear, describe, quant_layer
from fxpress.errors import LoweringError
from fxpress.ir.graph import Graph
from fxpress.ir.rewrite import constant_nodes, erase_dead, evaluate_constant
from fxpress.ops.binary import BINARY_OPS, MST_OPS, ops, pack_weight


class NativeBinaryLayer(nn.Module):
    """A binary linear / conv2d layer on the native kernels: dense XNOR GEMM, or MST reuse along a plan.

    Build one with `NativeBinaryLayer.dense(weight, ...)` (from a latent or +-1
    weight) or `NativeBinaryLayer.mst(packed_weight, plan, ...)` (from an MST op's
    operands).  `conv` is (kernel, stride, padding, dilation) for convolutions.
    """

    def __init__(self, k: int, packed: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, *,
                 conv: tuple | None = None, plan: torch.Tensor | None = None, positive: torch.Tensor | None = None,
                 signs: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale", None if scale is None else scale.detach().reshape(-1).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1).clone())
        self.register_buffer("plan", plan)
        self.register_buffer("positive", positive)
        self.k, self.conv, self.signs = k, conv, signs
        self._corrections: dict[tuple[int, int], torch.Tensor | None] = {}

    @classmethod
    def dense(cls, weight: torch.Tensor, scale=None, bias=None, conv: tuple | None = None) -> NativeBinaryLayer:
        signs = torch.where(weight.detach() >= 0, 1.0, -1.0)
        packed = kernels.pack_conv_weight(weight) if conv is not None else pack_weight(weight)
        return cls(int(weight[0].numel()), packed, scale, bias, conv=conv, signs=signs if conv is not None else None)

    @classmethod
    def mst(cls, packed_weight: torch.Tensor, plan: torch.Tensor, scale=None, bias=None,
            conv: tuple | None = None) -> NativeBinaryLayer:
        grouped, positive = kernels.kernel_plan(plan, packed_weight)
        return cls(int(plan[1]), packed_weight, scale, bias, conv=conv, plan=grouped, positive=positive)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ints = self._conv(x) if self.conv is not None else self._linear(x)
        out = ints.contiguous().to(x.dtype)
        shape = [1] * out.dim()
        shape[1 if self.conv is not None else -1] = -1
        if self.scale is not None:
            out = out * self.scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.k)
        if self.plan is None:
            ints = kernels.xnor_gemm(kernels.pack_signs(rows), self.packed, self.k)
        else:
            ints = kernels.mst_reuse(kernels.signs_transposed(rows), self.plan, self.positive)[:, :len(rows)].T
        return ints.reshape(*x.shape[:-1], -1)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        shape = kernels.conv_shape(x, *self.conv)
        batch, channels, rows = shape.batch, self.packed.shape[0], shape.batch * shape.out_h * shape.out_w
        if self.plan is not None:
            ints = kernels.mst_reuse(kernels.im2col_transposed(x, shape), self.plan, self.positive)[:, :rows]
            return ints.reshape(channels, batch, shape.out_h, shape.out_w).permute(1, 0, 2, 3)
        ints = kernels.xnor_gemm(kernels.im2col_pack(x, shape), self.packed, self.k)
        ints = ints.view(batch, shape.out_h, shape.out_w, channels).permute(0, 3, 1, 2)
        correction = self._correction(shape)
        return ints if correction is None else ints - correction

    def _correction(self, shape: kernels.ConvShape) -> torch.Tensor | None:
        key = (shape.height, shape.width)
        if key not in self._corrections:
            self._corrections[key] = kernels.padding_correction(self.signs, shape)
        return self._corrections[key]

    def extra_repr(self) -> str:
        kind = "conv2d" if self.conv is not None else "linear"
        return f"{kind}, C_out={self.packed.shape[0]}, K={self.k}, {'mst' if self.plan is not None else 'dense'}"


def _constant(graph: Graph, node: Any, constant: set, what: str, op: torch.fx.Node) -> Any:
    if isinstance(node, torch.fx.Node) and node not in constant:
        raise LoweringError(f"native backend: the {what} of {op.format_node()} depends on the inputs; "
                            f"it must be a constant")
    value = evaluate_constant(graph, node)
    return value.detach() if isinstance(value, torch.Tensor) else value


def native_layer(graph: Graph, node: torch.fx.Node, constant: set) -> NativeBinaryLayer:
    """The native module computing one binary op node."""
    if graph.info(node.args[0]).dtype != "f32":
        raise LoweringError(f"native backend takes float32 activations: {node.format_node()}")
    shift = 1 if node.target in MST_OPS else 0  # MST ops take (x, packed, plan, scale, bias, ...)
    scale = _constant(graph, node.args[2 + shift], constant, "scale", node)
    bias = _constant(graph, node.args[3 + shift], constant, "bias", node)
    if node.target in MST_OPS:
        packed = _constant(graph, node.args[1], constant, "packed weight", node)
        plan = _constant(graph, node.args[2], constant, "plan", node).to(torch.int32)
        conv = tuple(tuple(v) for v in node.args[5:9]) if node.target == ops.binary_conv2d_mst.default else None
        return NativeBinaryLayer.mst(packed, plan, scale, bias, conv)
    weight = _constant(graph, node.args[1], constant, "weight", node)
    conv = None
    if node.target == ops.binary_conv2d.default:
        conv = (tuple(weight.shape[2:]), *(tuple(v) for v in node.args[4:7]))
    return NativeBinaryLayer.dense(weight, scale, bias, conv)


@dataclass
class NativeProgram:
    """A graph whose binary and quantized ops run on the native kernels; call it like the model."""

    graph: Graph
    lowered: list[str] = field(default_factory=list)  # module paths of the lowered binary layers
    quantized: dict[str, str] = field(default_factory=dict)  # quantized linear's module path -> its kernel

    def __call__(self, *inputs: Any) -> Any:
        with torch.no_grad():
            return self.graph.module(*inputs)


def _replace_with_module(graph: Graph, node: torch.fx.Node, name: str, module: nn.Module) -> None:
    """Call `module` (added as `name`) on the node's first operand in place of the node."""
    graph.module.add_module(name, module)
    with graph.fx.inserting_before(node):
        call = graph.fx.call_module(name, (node.args[0],))
    call.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
    node.replace_all_uses_with(call)
    erase_dead(graph, [node])


def _quantized_layer(graph: Graph, node: torch.fx.Node, constant: set) -> NativeQuantLinear:
    x = graph.info(node.args[0])
    return quant_layer(node, lambda arg, what: _constant(graph, arg, constant, what, node), str(x.dtype),
                       int(x.shape[-1]))


def lower_native(graph: Graph) -> NativeProgram:
    """A copy of `graph` with every binary op replaced by a call of a NativeBinaryLayer and every
    quantized_linear by a NativeQuantLinear (a kernel, or the reference where none fits)."""
    kernels.library()  # build (or load) the kernels now, so a missing compiler fails here
    new = graph.copy()
    constant = constant_nodes(new)
    lowered, quantized = [], {}
    for node in [n for n in new.fx.nodes if n.op == "call_function" and n.target in BINARY_OPS]:
        path = new.info(node).module_path
        _replace_with_module(new, node, f"native_{len(lowered)}", native_layer(new, node, constant))
        lowered.append(path)
    for node in [n for n in new.fx.nodes if n.op == "call_function" and n.target in QUANT_LINEAR_OPS]:
        path = new.info(node).module_path or node.name
        layer = _quantized_layer(new, node, constant)
        _replace_with_module(new, node, f"native_quant_{len(quantized)}", layer)
        quantized[path if path not in quantized else f"{path}#{node.name}"] = describe(layer)
    new.remove_unused_attributes()
    new.recompile()
    return NativeProgram(new, lowered, quantized)


def run_native(graph: Graph) -> NativeProgram:
    """`fxpress run ... --target native`: the graph with its binary layers on the native kernels."""
    return lower_native(graph)
