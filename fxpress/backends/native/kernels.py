"""Python bindings of the C kernels in `binary_kernels.c`, on torch tensors.

Layouts (see the C file): packed rows are int64 tensors (rows, words)
whose bits are set where values are -1.  Linear rows hold K values in
order (ceil(K/64) words); convolution patches hold kh * kw taps of
ceil(C_in/64) words each (`pack_conv_weight` packs weights to match).
The MST kernel takes int8 activations (K, rows padded to 64) in PyTorch's
weight order and a plan whose positions are grouped by weight sign
(`kernel_plan`).  Integer results are exact:
`xnor_gemm(pack_signs(x), pack_weight(W), K)` equals `sign(x) @ sign(W).T`.

Every function checks dtypes and shapes, makes inputs contiguous and
allocates its output; the C code trusts what it is given.
"""
from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from fxpress.backends.native.build import load_library
from fxpress.errors import LoweringError
from fxpress.ops.binary import ReusePlan, pack_weight, unpack_signs

_P, _I = ctypes.c_void_p, ctypes.c_int64


class ConvShape(ctypes.Structure):
    """Mirror of the C `conv_shape` struct."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "batch", "channels", "height", "width", "kh", "kw", "stride_h", "stride_w",
        "pad_h", "pad_w", "dil_h", "dil_w", "out_h", "out_w")]


_SIGNATURES = {
    "fxp_pack_signs": [_P, _I, _I, _P],
    "fxp_signs_transposed": [_P, _I, _I, _I, _P],
    "fxp_pack_pixels": [_P, ctypes.POINTER(ConvShape), _P],
    "fxp_im2col_words": [_P, ctypes.POINTER(ConvShape), _P],
    "fxp_im2col_transposed": [_P, ctypes.POINTER(ConvShape), _I, _P],
    "fxp_xnor_gemm": [_P, _P, _I, _I, _I, _I, _P],
    "fxp_xnor_gemm_at": [_P, _P, _I, _I, _I, _I, _P, ctypes.c_int],
    "fxp_mst_reuse": [_P, _I, _P, _P, _P],
    "fxp_simd_level": [],
    "fxp_has_simd_level": [ctypes.c_int],
}
_INT_RESULT = ("fxp_simd_level", "fxp_has_simd_level", "fxp_xnor_gemm_at", "fxp_im2col_transposed")
# The XNOR GEMM's popcount paths, as `fxp_simd_level` numbers them.
LEVELS = {"scalar": 0, "avx512-vpopcntdq": 1, "avx2": 2, "neon": 3}
ROWS = 64  # the MST kernel's row tile: activations are padded to a multiple of it


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The compiled kernels with their ctypes signatures set."""
    lib = load_library()
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int if name in _INT_RESULT else None
    return lib


def simd_level() -> str:
    """Which popcount path `xnor_gemm` takes by default: 'avx512-vpopcntdq', 'avx2', 'neon' (aarch64) or 'scalar'."""
    level = library().fxp_simd_level()
    return next(name for name, value in LEVELS.items() if value == level)


def simd_levels() -> list[str]:
    """Every popcount path this build has (for `xnor_gemm(level=...)`); 'scalar' always."""
    return [name for name, value in LEVELS.items() if library().fxp_has_simd_level(value)]


def _float32(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise LoweringError(f"native binary kernels take float32 {what}, got {x.dtype}")
    return x.detach().contiguous()


def words(k: int) -> int:
    return math.ceil(k / 64)


def padded(rows: int) -> int:
    return math.ceil(rows / ROWS) * ROWS


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """(rows, K) float32 -> (rows, ceil(K/64)) int64 sign bits (1 = negative)."""
    x = _float32(x, "activations")
    rows, k = x.shape
    out = torch.empty(rows, words(k), dtype=torch.int64)
    library().fxp_pack_signs(x.data_ptr(), rows, k, out.data_ptr())
    return out


def signs_transposed(x: torch.Tensor) -> torch.Tensor:
    """(rows, K) float32 -> (K, padded(rows)) int8 of +1 / -1, zero in the padding."""
    x = _float32(x, "activations")
    rows, k = x.shape
    out = torch.zeros(k, padded(rows), dtype=torch.int8)
    library().fxp_signs_transposed(x.data_ptr(), rows, k, out.shape[1], out.data_ptr())
    return out


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, kh, kw) -> (C_out, kh * kw * ceil(C_in/64)) int64, the layout of `im2col_pack`."""
    c_out, c_in, kh, kw = weight.shape
    taps = weight.detach().permute(0, 2, 3, 1).reshape(c_out * kh * kw, c_in).contiguous()
    return pack_weight(taps).reshape(c_out, -1)


def xnor_gemm(a: torch.Tensor, b: torch.Tensor, k: int, level: str = "best") -> torch.Tensor:
    """Packed (M, W) x packed (N, W) -> int32 (M, N) of K - 2 popcount(a_i ^ b_j).

    `level` picks a popcount path of `simd_levels()` (for tests); "best" is `simd_level()`.
    """
    if level != "best" and level not in LEVELS:
        raise ValueError(f"xnor_gemm: unknown level {level!r}; choose 'best' or one of {', '.join(LEVELS)}")
    if a.dtype != torch.int64 or b.dtype != torch.int64 or a.shape[1] != b.shape[1] or a.shape[1] * 64 < k:
        raise LoweringError(f"xnor_gemm wants int64 rows with the same number of words (at least "
                            f"{words(k)} for K={k}), got {a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32)
    if level == "best":
        library().fxp_xnor_gemm(a.data_ptr(), b.data_ptr(), a.shape[0], b.shape[0], k, a.shape[1], out.data_ptr())
    elif library().fxp_xnor_gemm_at(a.data_ptr(), b.data_ptr(), a.shape[0], b.shape[0], k, a.shape[1],
                                    out.data_ptr(), LEVELS[level]) != 0:
        raise LoweringError(f"xnor_gemm: this build has no {level} path (it has {', '.join(simd_levels())})")
    return out


def conv_shape(x: torch.Tensor, kernel: tuple[int, int], stride, padding, dilation) -> ConvShape:
    batch, channels, height, width = x.shape
    out = [(size + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
           for i, size in enumerate((height, width))]
    if min(out) < 1:
        raise LoweringError(f"binary conv2d: input {list(x.shape)} is smaller than the kernel {list(kernel)}")
    return ConvShape(batch, channels, height, width, kernel[0], kernel[1], stride[0], stride[1],
                     padding[0], padding[1], dilation[0], dilation[1], out[0], out[1])


def im2col_pack(x: torch.Tensor, shape: ConvShape) -> torch.Tensor:
    """NCHW float32 -> (B * OH * OW, kh * kw * ceil(C/64)) packed patches; padded taps read as +1."""
    x = _float32(x, "activations")
    channel_words = words(shape.channels)
    pixels = torch.empty(shape.batch * shape.height * shape.width, channel_words, dtype=torch.int64)
    library().fxp_pack_pixels(x.data_ptr(), ctypes.byref(shape), pixels.data_ptr())
    rows = shape.batch * shape.out_h * shape.out_w
    out = torch.empty(rows, shape.kh * shape.kw * channel_words, dtype=torch.int64)
    library().fxp_im2col_words(pixels.data_ptr(), ctypes.byref(shape), out.data_ptr())
    return out


def im2col_transposed(x: torch.Tensor, shape: ConvShape) -> torch.Tensor:
    """NCHW float32 -> (K, padded(B * OH * OW)) int8 patches of +1 / -1 (0 for padded taps and rows)."""
    x = _float32(x, "activations")
    rows, k = shape.batch * shape.out_h * shape.out_w, shape.channels * shape.kh * shape.kw
    out = torch.zeros(k, padded(rows), dtype=torch.int8)
    if library().fxp_im2col_transposed(x.data_ptr(), ctypes.byref(shape), out.shape[1], out.data_ptr()) != 0:
        raise MemoryError(f"native im2col: no memory for the signs of a {list(x.shape)} input")
    return out


def kernel_plan(plan: torch.Tensor, packed_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan with each step's positions grouped +1 first, and the count of +1 positions per step."""
    reuse = ReusePlan.from_tensor(plan)
    signs = unpack_signs(packed_weight, reuse.k)
    ordered, positive = [], []
    for channel, where in zip(reuse.channels.tolist(), reuse.positions):
        plus = signs[channel, torch.from_numpy(where)].numpy() > 0
        ordered.append(np.concatenate([where[plus], where[~plus]]))
        positive.append(int(plus.sum()))
    grouped = ReusePlan(reuse.k, reuse.channels, reuse.parents, ordered).to_tensor()
    return grouped, torch.tensor(positive, dtype=torch.int32)


def mst_reuse(xt: torch.Tensor, plan: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """(K, padded rows) int8 activations -> (C, padded rows) int32, channels computed along a kernel plan."""
    channels, k = int(plan[0]), int(plan[1])
    if xt.dtype != torch.int8 or xt.shape[0] != k or xt.shape[1] % ROWS or positive.shape != (channels,):
        raise LoweringError(f"mst_reuse: a plan for C={channels}, K={k} does not fit activations "
                            f"{xt.dtype}{list(xt.shape)} (rows must be padded to {ROWS})")
    xt, plan, positive = xt.contiguous(), plan.to(torch.int32).contiguous(), positive.to(torch.int32).contiguous()
    out = torch.empty(channels, xt.shape[1], dtype=torch.int32)
    library().fxp_mst_reuse(xt.data_ptr(), xt.shape[1], plan.data_ptr(), positive.data_ptr(), out.data_ptr())
    return out


def padding_correction(signs: torch.Tensor, shape: ConvShape) -> torch.Tensor | None:
    """What padded taps (packed as +1) add to each output: (C, OH, OW) int32, None without padding."""
    if shape.pad_h == 0 and shape.pad_w == 0:
        return None
    indicator = torch.ones(1, shape.channels, shape.height + 2 * shape.pad_h, shape.width + 2 * shape.pad_w)
    indicator[:, :, shape.pad_h:shape.pad_h + shape.height, shape.pad_w:shape.pad_w + shape.width] = 0
    correction = F.conv2d(indicator, signs, None, (shape.stride_h, shape.stride_w), 0,
                          (shape.dil_h, shape.dil_w))
    return correction[0].round().to(torch.int32)
