"""Group-quantized weights: `fxpress::quantized_linear`, `fxpress::quantized_embedding`, their packed layout.

    quantized_linear(x, codes, scales, zeros, codebook, bias, bits, group)   -> y = x @ W.T + bias
    quantized_embedding(indices, codes, scales, zeros, codebook, bits, group, embedding_dim) -> W[indices]

W (N rows, K columns; a linear's out x in, an embedding's vocabulary x dim) is quantized in groups of
`group` consecutive values along K in each row.  K is padded with zero columns up to Kp, a multiple
of `group`, only when asked (`pad=True`); otherwise a K that `group` does not divide is an error.

    codes     uint8   (N, ceil(Kp * bits / 8))  per row a little-endian bit stream: code k occupies bits
                                                [k * bits, (k + 1) * bits) (4 bits: byte k // 2, low nibble
                                                = even k; 8 bits: one byte each; 2 and 3 bits likewise)
    scales    float32 (N, Kp / group)
    zeros     absent  (sym)                     W ~ scale * (q - 2^(bits-1))
              uint8   (N, Kp / group)           W ~ scale * (q - zero)            (asym, integer zero point)
              float32 (N, Kp / group)           W ~ scale * q + offset            (asym, float offset: GGUF Q4_1)
    codebook  absent, or float32 (2^bits,)      learned levels: W ~ scale * codebook[q] + offset (float
                                                zeros), scale * (codebook[q] - zero) (uint8 zeros), or
                                                scale * codebook[q] (no zeros: the codebook holds signed
                                                levels; arange(2^bits) - 2^(bits-1) is the uniform sym grid)

bits is one of 2, 3, 4, 8; the kind of `zeros` (none, uint8, float32) is the scheme.  Columns past K
(padding) are dropped after dequantizing.  Stored bytes are codes + scales + zeros + codebook
(`QuantizedWeight.nbytes`); `bits_per_weight` divides them by N * K.

Rounding to nearest (`quantize_weight`) picks each group's parameters from its values: asym with a
float offset uses [min, max] (scale = (max - min) / (2^bits - 1), offset = min, as GGUF Q4_1); asym
with an integer zero widens the range to include 0 so the zero point is an integer in [0, 2^bits - 1];
sym uses scale = 2 max|w| / (2^bits - 1).  Every value is then within scale / 2 of its level.

The reference implementation dequantizes W and calls F.linear (float activations); gradients flow to
x only.  MACs: tokens x N x K.  Backends lower the ops through their own rule tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fxpress.ir.opinfo import OpInfo, define_op
from fxpress.ops.flow_rules import linear_flow

BITS = (2, 3, 4, 8)
FORMS = ("sym", "int", "float")  # the scheme, as the kind of zeros tensor: none, uint8, float32
_ROW_CHUNK = 4096  # rows packed at a time (bounds the bit-stream scratch of a large embedding)


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")


def packed_bytes(features: int, bits: int) -> int:
    """Bytes of one row of `features` codes: ceil(features * bits / 8)."""
    return -(-features * bits // 8)


def quant_form(scheme: str, zero: str | None) -> str:
    """The form of the zeros tensor: sym (none), int (uint8 zero points) or float (float32 offsets)."""
    if scheme == "sym":
        if zero is not None:
            raise ValueError(f"scheme=sym has no zero point (W = scale * (q - 2^(bits-1))), so zero={zero} "
                             "makes no sense; leave zero unset or use scheme=asym")
        return "sym"
    if scheme != "asym":
        raise ValueError(f"scheme must be asym or sym, got {scheme!r}")
    if zero not in (None, "float", "int"):
        raise ValueError(f"zero must be float or int, got {zero!r}")
    return zero or "float"


# -- bit packing -----------------------------------------------------------------------------------
def pack_codes(q: Tensor, bits: int) -> Tensor:
    """(N, K) integer codes in [0, 2^bits) -> uint8 (N, ceil(K * bits / 8)), little-endian bit streams."""
    check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"codes are (rows, columns), got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for bits={bits}")
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous().clone()
    return torch.cat([_pack_rows(chunk, bits) for chunk in q.split(_ROW_CHUNK)]) if q.shape[0] else \
        q.new_zeros(0, packed_bytes(q.shape[1], bits))


def _pack_rows(q: Tensor, bits: int) -> Tensor:
    rows, features = q.shape
    width = packed_bytes(features, bits)
    if 8 % bits == 0:  # whole codes per byte: code j of a byte sits at bits [j * bits, (j + 1) * bits)
        per = 8 // bits
        q = F.pad(q, (0, width * per - features))
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return (q.view(rows, width, per) << shifts).sum(-1, dtype=torch.uint8)
    stream = ((q.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(rows, features * bits)
    stream = F.pad(stream, (0, width * 8 - features * bits))
    return (stream.view(rows, width, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_codes(codes: Tensor, bits: int, features: int) -> Tensor:
    """uint8 (N, ceil(K * bits / 8)) -> the (N, K) uint8 codes `pack_codes` stored."""
    check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] < packed_bytes(features, bits):
        raise ValueError(f"codes must be uint8 (rows, >= {packed_bytes(features, bits)}) for {features} "
                         f"{bits}-bit values, got {codes.dtype}{tuple(codes.shape)}")
    rows, width = codes.shape
    if bits == 8:
        return codes[:, :features]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((codes.unsqueeze(-1) >> shifts) & mask).reshape(rows, width * (8 // bits))[:, :features]
    stream = ((codes.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(rows, width * 8)
    stream = stream[:, :features * bits].reshape(rows, features, bits)
    return (stream << torch.arange(bits, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


# -- group parameters, encoding, decoding ----------------------------------------------------------
def group_params(values: Tensor, bits: int, form: str) -> tuple[Tensor, Tensor | None]:
    """Scale and zero (integer zero point or float offset; None for sym) of groups on the last axis."""
    maxq = 2 ** bits - 1
    if form == "float":
        low, high = values.amin(-1), values.amax(-1)
        return (high - low) / maxq, low
    if form == "int":
        low, high = values.amin(-1).clamp(max=0), values.amax(-1).clamp(min=0)
        scale = (high - low) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.round(-low / scale).clamp(0, maxq)
    if form == "sym":
        scale = 2 * values.abs().amax(-1) / maxq
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    raise ValueError(f"unknown quantization form {form!r}; one of {', '.join(FORMS)}")


def encode(values: Tensor, scale: Tensor, zero: Tensor | None, bits: int, form: str) -> Tensor:
    """Nearest codes (as floats) of `values` under broadcastable group parameters."""
    maxq = 2 ** bits - 1
    if form == "float":
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.where(scale > 0, torch.round((values - zero) / safe), torch.zeros_like(values))
    elif form == "int":
        q = torch.round(values / scale) + zero
    else:
        q = torch.round(values / scale) + 2 ** (bits - 1)
    return q.clamp(0, maxq)


def decode(q: Tensor, scale: Tensor, zero: Tensor | None, bits: int, form: str,
           codebook: Tensor | None = None) -> Tensor:
    """Values of codes `q` under broadcastable group parameters (the module doc's formulas)."""
    levels = codebook.to(scale.dtype)[q.long()] if codebook is not None else q.to(scale.dtype)
    if form == "sym":
        return scale * (levels if codebook is not None else levels - 2 ** (bits - 1))
    if form == "int":
        return scale * (levels - zero.to(scale.dtype))
    return scale * levels + zero


def zeros_form(zeros: Tensor | None) -> str:
    """The form a stored zeros tensor stands for: none -> sym, uint8 -> int, float32 -> float."""
    return "sym" if zeros is None else "int" if zeros.dtype == torch.uint8 else "float"


# -- the packed weight -----------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedWeight:
    """A weight (N, K) in the layout of the module doc."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor | None
    codebook: Tensor | None
    bits: int
    group: int
    in_features: int  # K (the padded width is scales.shape[1] * group)

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def padded_features(self) -> int:
        return int(self.scales.shape[1]) * self.group

    @property
    def form(self) -> str:
        return zeros_form(self.zeros)

    @property
    def tensors(self) -> dict[str, Tensor]:
        found = {"codes": self.codes, "scales": self.scales, "zeros": self.zeros, "codebook": self.codebook}
        return {name: t for name, t in found.items() if t is not None}

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes + scales + zeros + codebook."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(1, self.out_features * self.in_features)

    def unpacked_codes(self) -> Tensor:
        """(N, Kp) uint8 codes."""
        return unpack_codes(self.codes, self.bits, self.padded_features)

    def dequantize(self) -> Tensor:
        """The float32 (N, K) weight the codes stand for."""
        return dequantize(self.codes, self.scales, self.zeros, self.codebook, self.bits, self.group,
                          self.in_features)


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor | None, codebook: Tensor | None, bits: int,
               group: int, in_features: int) -> Tensor:
    """The float32 (N, K) weight of a packed one (columns past K, the padding, dropped)."""
    check_layout(codes, scales, zeros, codebook, bits, group, in_features)
    rows, groups = scales.shape
    q = unpack_codes(codes, bits, groups * group).view(rows, groups, group)
    zero = None if zeros is None else zeros.unsqueeze(-1)
    weight = decode(q, scales.float().unsqueeze(-1), zero, bits, zeros_form(zeros), codebook)
    return weight.reshape(rows, groups * group)[:, :in_features]


def pack_weight(q: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group: int, in_features: int,
                form: str, codebook: Tensor | None = None) -> QuantizedWeight:
    """Codes (N, Kp) and group parameters (N, Kp / group) in the stored dtypes."""
    stored_zeros = None if form == "sym" else zeros.to(torch.uint8) if form == "int" else zeros.float()
    return QuantizedWeight(pack_codes(q, bits), scales.float().contiguous(),
                           None if stored_zeros is None else stored_zeros.contiguous(),
                           None if codebook is None else codebook.float(), bits, group, in_features)


def padded_width(in_features: int, group: int, pad: bool) -> int:
    """Kp: K itself when `group` divides it, the next multiple with `pad`, else a ValueError."""
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if in_features % group:
        if not pad:
            raise ValueError(f"K = {in_features} is not a multiple of group {group}; choose a group that divides "
                             "it or pad with zeros (pad=true)")
        return math.ceil(in_features / group) * group
    return in_features


def quantize_weight(weight: Tensor, bits: int = 4, group: int = 32, scheme: str = "asym", zero: str | None = None,
                    pad: bool = False) -> QuantizedWeight:
    """Round-to-nearest group quantization of a (N, K) weight into the layout of the module doc."""
    check_bits(bits)
    form = quant_form(scheme, zero)
    if weight.dim() != 2:
        raise ValueError(f"a weight is (rows, columns), got shape {tuple(weight.shape)}")
    rows, features = weight.shape
    padded = padded_width(features, group, pad)
    w = F.pad(weight.detach().float(), (0, padded - features)).view(rows, padded // group, group)
    scale, zero_point = group_params(w, bits, form)
    q = encode(w, scale.unsqueeze(-1), None if zero_point is None else zero_point.unsqueeze(-1), bits, form)
    return pack_weight(q.reshape(rows, padded), scale, zero_point, bits, group, features, form)


def check_layout(codes: Tensor, scales: Tensor, zeros: Tensor | None, codebook: Tensor | None, bits: int,
                 group: int, in_features: int) -> None:
    """Shapes and dtypes fit the module doc."""
    problems = []
    if bits not in BITS:
        problems.append(f"bits must be one of {BITS}, got {bits}")
    elif scales.dim() != 2 or scales.dtype != torch.float32:
        problems.append(f"scales must be float32 (N, Kp / group), got {scales.dtype}{tuple(scales.shape)}")
    else:
        rows, padded = scales.shape[0], scales.shape[1] * group
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (rows, packed_bytes(padded, bits)):
            problems.append(f"codes must be uint8 ({rows}, {packed_bytes(padded, bits)}), got "
                            f"{codes.dtype}{tuple(codes.shape)}")
        if not padded - group < in_features <= padded:
            problems.append(f"{in_features} input features do not fit {scales.shape[1]} groups of {group}")
        if zeros is not None and (zeros.shape != scales.shape or zeros.dtype not in (torch.uint8, torch.float32)):
            problems.append(f"zeros must be uint8 or float32 {tuple(scales.shape)}, got "
                            f"{zeros.dtype}{tuple(zeros.shape)}")
    if codebook is not None and (tuple(codebook.shape) != (2 ** bits,) or codebook.dtype != torch.float32):
        problems.append(f"codebook must be float32 ({2 ** bits},), got {codebook.dtype}{tuple(codebook.shape)}")
    if problems:
        raise ValueError("quantized weight: " + "; ".join(problems))


# -- the ops ---------------------------------------------------------------------------------------
def quantized_linear_reference(x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor | None,
                               codebook: Tensor | None, bias: Tensor | None, bits: int, group: int) -> Tensor:
    """x @ W.T + bias with W dequantized: the op's definition."""
    weight = dequantize(codes, scales, zeros, codebook, bits, group, x.shape[-1]).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _quantized_linear(x, codes, scales, zeros, codebook, bias, bits, group):
    check_layout(codes, scales, zeros, codebook, bits, group, x.shape[-1])
    if bias is not None and tuple(bias.shape) != (codes.shape[0],):
        raise ValueError(f"quantized_linear: bias {tuple(bias.shape)} is not ({codes.shape[0]},)")
    with torch.no_grad():
        return quantized_linear_reference(x, codes, scales, zeros, codebook, bias, bits, group)


def _quantized_linear_fake(x, codes, scales, zeros, codebook, bias, bits, group):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def _quantized_embedding(indices, codes, scales, zeros, codebook, bits, group, embedding_dim):
    check_layout(codes, scales, zeros, codebook, bits, group, embedding_dim)
    rows = indices.reshape(-1).long()
    picked = dequantize(codes[rows], scales[rows], None if zeros is None else zeros[rows], codebook, bits,
                        group, embedding_dim)
    return picked.reshape(*indices.shape, embedding_dim)


def _quantized_embedding_fake(indices, codes, scales, zeros, codebook, bits, group, embedding_dim):
    return scales.new_empty(*indices.shape, embedding_dim)


# A plain torch.library fragment, as for sparse_linear (no per-call @custom_op wrapper cost).
_LIBRARY = torch.library.Library("fxpress", "FRAGMENT")
_LIBRARY.define("quantized_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? codebook, "
                "Tensor? bias, int bits, int group) -> Tensor")
_LIBRARY.define("quantized_embedding(Tensor indices, Tensor codes, Tensor scales, Tensor? zeros, "
                "Tensor? codebook, int bits, int group, int embedding_dim) -> Tensor")
_LIBRARY.impl("quantized_linear", _quantized_linear, "CompositeExplicitAutograd")
_LIBRARY.impl("quantized_embedding", _quantized_embedding, "CompositeExplicitAutograd")
torch.library.register_fake("fxpress::quantized_linear", _quantized_linear_fake, lib=_LIBRARY)
torch.library.register_fake("fxpress::quantized_embedding", _quantized_embedding_fake, lib=_LIBRARY)


def _setup(ctx, inputs, output) -> None:
    ctx.inputs = inputs


def _backward(ctx, grad):
    """d y / d x = grad @ W (the packed weight is frozen: no gradient for codes, scales, zeros or bias)."""
    x, codes, scales, zeros, codebook, _bias, bits, group = ctx.inputs
    weight = dequantize(codes, scales, zeros, codebook, bits, group, x.shape[-1]).to(grad.dtype)
    return grad @ weight, None, None, None, None, None, None, None


torch.library.register_autograd("fxpress::quantized_linear", _backward, setup_context=_setup, lib=_LIBRARY)

QUANTIZED_LINEAR = torch.ops.fxpress.quantized_linear.default  # x @ W.T + bias, W packed (module doc)
QUANTIZED_EMBEDDING = torch.ops.fxpress.quantized_embedding.default  # rows of a packed W
QUANTIZED_OPS = (QUANTIZED_LINEAR, QUANTIZED_EMBEDDING)


def quantized_linear_macs(node: Any, arg_shapes: list, out: Any) -> int:
    """tokens x N x K: the dequantized weight's multiply-adds."""
    x = arg_shapes[0]
    if not x or not out:
        return 0
    return math.prod(out) * x[-1]


define_op(OpInfo(QUANTIZED_LINEAR, "matmul", quantized_linear_macs, linear_flow,
                 doc="x @ W.T + bias, W group-quantized (codes, scales, zeros, codebook)"))
define_op(OpInfo(QUANTIZED_EMBEDDING, "embedding", doc="rows of a group-quantized W"))
