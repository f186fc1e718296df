"""Lower `fxpress::quantized_linear` nodes onto the native quantized kernels (fxpress/ops/native_quant.py).

One rule per weight layout, picked by `kernel_for` (the first that fits wins):

    bits=4, no codebook, any zeros (sym, uint8, float)   -> Int4Linear      (int8 activations per row and group)
    bits=4, codebook (sym, uint8, float zeros)            -> CodebookLinear  (float activations)
    bits=8, sym, one group per row (group = K)            -> Int8Linear      (int8 activations per row)
    anything else (bits 2 and 3, 8-bit with several groups or a zero point, a group that is not a multiple
    of 32, non-float32 activations, kernels unavailable)  -> the op's reference (dequantize + F.linear)

The reason a layer stays on the reference is kept (`NativeQuantLinear.kernel`), and the compile info
lists every layer's kernel.  The int4 and int8 kernels quantize activations to int8, so their outputs
differ from the graph's by at most `native_quant.activation_error_bound`; the codebook kernel does not.
`fxpress::quantized_embedding` is a gather: it always runs its reference in PyTorch.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.ops import native_quant
from fxpress.ops.quant import QUANTIZED_LINEAR, quantized_linear_reference, zeros_form

REFERENCE = "reference"
# A whole model's outputs on the activation-quantizing kernels against the eager quantized graph:
# max |native - eager| <= OUTPUT_TOLERANCE * max |eager| (docs/quantization.md, "Compiled (native)").
OUTPUT_TOLERANCE = 0.05


class NativeQuantLinear(nn.Module):
    """One quantized linear: its planes as buffers, the bound kernel (None: the reference), and why."""

    def __init__(self, planes: dict[str, torch.Tensor | None], bits: int, group: int, in_features: int,
                 kernel: str, reason: str = ""):
        super().__init__()
        for name in ("codes", "scales", "zeros", "codebook", "bias"):
            value = planes.get(name)
            self.register_buffer(name, None if value is None else value.detach().contiguous())
        self.bits, self.group, self.in_features = bits, group, in_features
        self.padded = int(self.scales.shape[1]) * group
        self.kernel, self.reason = kernel, reason
        self._bind()

    def _bind(self) -> None:
        """Bind the kernel to the planes' memory (again after a copy moved them: the kernel holds pointers)."""
        self._bound: Callable | None = None if self.kernel == REFERENCE else _BINDERS[self.kernel](self)
        self._bound_to = self.codes.data_ptr()

    def __getstate__(self) -> dict:
        """A copy drops the binding (ctypes pointers into these planes) and binds to its own on first call."""
        return {**super().__getstate__(), "_bound": None, "_bound_to": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == REFERENCE:
            return quantized_linear_reference(x, self.codes, self.scales, self.zeros, self.codebook, self.bias,
                                              self.bits, self.group)
        if self.codes.data_ptr() != self._bound_to:  # deepcopy / .to() gave the module new tensors
            self._bind()
        if self.padded != self.in_features:  # zero columns match the zero-padded weight columns
            x = F.pad(x, (0, self.padded - self.in_features))
        return self._bound(x)

    def extra_repr(self) -> str:
        return f"{self.kernel}, bits={self.bits}, group={self.group}, K={self.in_features}, N={self.codes.shape[0]}"


def _int4(layer: NativeQuantLinear) -> Callable:
    return native_quant.Int4Linear(layer.codes, layer.scales, layer.zeros, layer.bias, layer.group,
                                   zeros_form(layer.zeros))


def _codebook(layer: NativeQuantLinear) -> Callable:
    form = zeros_form(layer.zeros)
    # scale * (codebook[q] - zero) = scale * codebook[q] + (-scale * zero): an offset per group
    offsets = {"sym": None, "float": layer.zeros,
               "int": None if layer.zeros is None else (-layer.scales * layer.zeros.float()).contiguous()}[form]
    layer.register_buffer("offsets", offsets)
    return native_quant.CodebookLinear(layer.codes, layer.scales, offsets, layer.codebook, layer.bias, layer.group)


def _int8(layer: NativeQuantLinear) -> Callable:
    # sym 8-bit: W = scale * (q - 128); q - 128 is any int8 value, one scale per row (one group)
    layer.register_buffer("wq", (layer.codes.to(torch.int16) - 128).to(torch.int8).contiguous())
    layer.register_buffer("wscale", layer.scales[:, 0].contiguous())
    return native_quant.Int8Linear(layer.wq, layer.wscale, layer.bias)


_BINDERS: dict[str, Callable[[NativeQuantLinear], Callable]] = {
    "int4_linear": _int4, "codebook_linear": _codebook, "int8_linear": _int8}
KERNELS = tuple(_BINDERS)


def kernel_for(bits: int, group: int, padded: int, form: str, codebook: bool, x_dtype: str) -> tuple[str, str]:
    """(kernel name, reason) for a layer's layout; REFERENCE with the reason when no kernel fits."""
    if x_dtype != "f32":
        return REFERENCE, f"activations are {x_dtype}; the kernels take float32"
    if not native_quant.available():
        return REFERENCE, "the quantized kernels did not build on this machine"
    if bits == 4:
        if group % 32:
            return REFERENCE, f"group {group} is not a multiple of 32"
        return ("codebook_linear", "") if codebook else ("int4_linear", "")
    if bits == 8 and form == "sym" and not codebook:
        if group != padded:
            return REFERENCE, f"8-bit with {padded // group} groups per row; the int8 kernel takes one scale per row"
        return "int8_linear", ""
    if bits == 8:
        return REFERENCE, "8-bit with a zero point or codebook; the int8 kernel is symmetric"
    return REFERENCE, f"no native kernel for {bits}-bit codes"


def quant_layer(node: torch.fx.Node, value: Callable[[Any, str], Any], x_dtype: str,
                in_features: int) -> NativeQuantLinear:
    """The native module computing one quantized_linear node; `value(arg, what)` reads a constant operand."""
    _x, codes, scales, zeros, codebook, bias, bits, group = node.args
    planes = {"codes": value(codes, "codes"), "scales": value(scales, "scales"), "zeros": value(zeros, "zeros"),
              "codebook": value(codebook, "codebook"), "bias": value(bias, "bias")}
    if planes["bias"] is not None:
        planes["bias"] = planes["bias"].float()
    padded = int(planes["scales"].shape[1]) * group
    kernel, reason = kernel_for(bits, group, padded, zeros_form(planes["zeros"]), planes["codebook"] is not None,
                                x_dtype)
    return NativeQuantLinear(planes, bits, group, in_features, kernel, reason)


def describe(layer: NativeQuantLinear) -> str:
    """A layer's kernel as the compile info shows it: 'int4_linear', or 'reference (why)'."""
    return layer.kernel if layer.kernel != REFERENCE else f"{REFERENCE} ({layer.reason})"


def outputs_agree(native: torch.Tensor, eager: torch.Tensor, kernels: dict[str, str]) -> bool:
    """Whether a compiled model's output agrees with the graph's: bit for bit unless some quantized linear
    runs on a kernel (`kernels`: the compile info's quantized_kernels), then within OUTPUT_TOLERANCE of the
    output's largest magnitude."""
    if not any(kernel in KERNELS for kernel in kernels.values()):
        return torch.equal(native, eager)
    if native.shape != eager.shape or not torch.isfinite(native).all():
        return False
    return bool((native - eager).abs().max() <= OUTPUT_TOLERANCE * eager.abs().max()) if eager.numel() else True


QUANT_LINEAR_OPS = (QUANTIZED_LINEAR,)

__all__ = ["KERNELS", "NativeQuantLinear", "OUTPUT_TOLERANCE", "QUANT_LINEAR_OPS", "REFERENCE", "describe",
           "kernel_for", "outputs_agree", "quant_layer"]
