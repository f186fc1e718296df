"""Python binding of `quant_kernels.c`: int4 x int8, int8 x int8 and codebook linear layers on CPU.

The weight layout is the contract with the quantize pass (fxpress/ops/quant.py).  W is
(N = out_features, K = in_features), quantized in groups of `group` consecutive values along K per row
(K a multiple of group, group a multiple of 32):

- `codes` uint8 (N, K * bits / 8): per row a little-endian bit stream, value k at bits
  [k * bits, (k + 1) * bits); for 4 bits byte k // 2, low nibble = even k.
- `scales` float32 (N, K / group).
- zeros, by `zero_kind`: "int"  uint8 (N, K / group), W = scale (q - z);
  "float"  float32 (N, K / group), W = scale q + offset;  "sym"  None, W = scale (q - 2^(bits-1)).
- `bias` float32 (N,) or None.

The kernels quantize activations themselves: symmetric int8 per row and per group of the weight
(`quantize_activations`), sx = max|x| / 127 and qx = round-half-even(x * (127 / max|x|)) in [-127, 127],
so each group is one exact integer dot product d = sum q qx - z sum qx and y = sum_g (scale sx) d
(the float form: y = sum_g (scale sx) sum q qx + (offset sx) sum qx).  Every form therefore computes
x_hat @ W.T with x_hat = sx qx, and |y - x @ W.T| <= 1/2 sum_g sx_g |W[n, g]|_1
(`activation_error_bound`).  The int8 x int8 kernel takes int8 weights (any value) with one scale per
output channel and quantizes activations per row (one group of K).  The codebook kernel computes
W = scale * codebook[q] + offset (offset optional) and a float GEMV, no activation quantization.

`Int4Linear`, `Int8Linear` and `CodebookLinear` check and bind the weight planes once (what a compiled
graph holds) and check only x per call; `int4_linear` etc. do both per call.  One thread; `level`
forces a path ("scalar", "avx2", "avx512vnni"; one this CPU lacks falls back to the best it has).

From `gemm_rows()` rows on (32; 16 on a CPU with AMX-INT8), `Int8Linear` at level "best" quantizes the
activations the same way in torch and takes the integer product from oneDNN's int8 GEMM
(`torch._int_mm`), which uses AMX tiles where the CPU has them and VNNI otherwise: the same int32 dot and
the same float combination, so the same output, at 0.35-0.53x of fp32 time against the C kernel's
0.53-0.75x at 64-256 rows on the AVX-512-VNNI host (1 thread).  K < 8 stays on the C kernel
(`torch._int_mm` returns wrong values at K = 1 in torch 2.13).

`reference_*` are torch versions of the same integer math, `pack_rtn_int4` / `pack_int8` /
`pack_codebook` are round-to-nearest packers for tests and benchmarks (the quantize pass owns the
real quantizers).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import NamedTuple

import torch

from fxpress.errors import LoweringError
from fxpress.utils.cbuild import kernels_available, load_kernels

SOURCE = Path(__file__).with_name("quant_kernels.c")
LEVELS = {"best": 0, "scalar": 1, "avx2": 2, "avx512vnni": 3}
ZERO_KINDS = {"sym": 0, "int": 1, "float": 2}
_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The compiled quantized kernels with their ctypes signatures set (built first if needed)."""
    return load_kernels(SOURCE, {
        "fxp_int4_linear": ([_P, _I, _I, _P, _P, _P, _P, _I, _I, _C, _C, _P], _C),
        "fxp_int8_linear": ([_P, _I, _I, _P, _P, _P, _I, _C, _P], _C),
        "fxp_int8_linear_bound": ([_P, _P, _I, _P], _C),
        "fxp_codebook_linear": ([_P, _I, _I, _P, _P, _P, _P, _P, _I, _I, _C, _P], _C),
        "fxp_quant_simd_level": ([], _C)})


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernels build and load here (once per process; failures are logged, not raised)."""
    return kernels_available(library, "quantized linear kernels")


def simd_level() -> str:
    """The path this CPU runs by default: 'avx512vnni', 'avx2' or 'scalar'."""
    level = library().fxp_quant_simd_level()
    return next(name for name, value in LEVELS.items() if value == level)


# ---- argument checks ------------------------------------------------------------------------------
def _check(op: str, name: str, tensor: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """One LoweringError naming `op`, the argument and what was expected, for any mismatch."""
    if not isinstance(tensor, torch.Tensor):
        raise LoweringError(f"{op}: `{name}` must be a {dtype} tensor of shape {shape}, got {type(tensor).__name__}")
    problem = (f"dtype {tensor.dtype}" if tensor.dtype != dtype else
               f"shape {tuple(tensor.shape)}" if tuple(tensor.shape) != shape else
               f"device {tensor.device}" if tensor.device.type != "cpu" else
               "a non-contiguous layout" if not tensor.is_contiguous() else None)
    if problem:
        raise LoweringError(f"{op}: `{name}` must be a contiguous CPU {dtype} tensor of shape {shape}, "
                            f"got {problem}; pack it with the quantize pass (or call .contiguous())")


def _rows(op: str, x: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., K) float32 on CPU as a contiguous (rows, K) matrix (checked cheaply: this runs every call)."""
    if not isinstance(x, torch.Tensor) or x.dtype is not torch.float32 or not x.is_cpu or x.dim() < 1:
        got = f"{x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise LoweringError(f"{op}: `x` must be a float32 CPU tensor (..., K), got {got}")
    if x.shape[-1] != k:
        raise LoweringError(f"{op}: `x` has {x.shape[-1]} input features but the weight has K = {k}")
    rows = x if x.dim() == 2 else x.reshape(-1, k)
    return rows if rows.is_contiguous() else rows.contiguous()


def _level(op: str, level: str) -> int:
    if level not in LEVELS:
        raise LoweringError(f"{op}: unknown `level` {level!r}; choose one of {', '.join(LEVELS)}")
    return LEVELS[level]


def _int4_shapes(op: str, codes: torch.Tensor, group: int) -> tuple[int, int, int]:
    """(N, K, groups) from `codes`, after checking `group`."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise LoweringError(f"{op}: `codes` must be a uint8 tensor (N, K / 2)")
    n, k = codes.shape[0], codes.shape[1] * 2
    if not isinstance(group, int) or group <= 0 or group % 32 or k % group:
        raise LoweringError(f"{op}: `group` must be a positive multiple of 32 that divides K = {k}, got {group!r}")
    return n, k, k // group


def _check_int4(op: str, codes, scales, zeros, bias, group, zero_kind) -> tuple[int, int, int]:
    n, k, groups = _int4_shapes(op, codes, group)
    _check(op, "codes", codes, torch.uint8, (n, k // 2))
    _check(op, "scales", scales, torch.float32, (n, groups))
    if zero_kind not in ZERO_KINDS:
        raise LoweringError(f"{op}: unknown `zero_kind` {zero_kind!r}; choose one of {', '.join(ZERO_KINDS)}")
    if zero_kind == "sym" and zeros is not None:
        raise LoweringError(f"{op}: `zeros` must be None for zero_kind 'sym'")
    if zero_kind != "sym":
        _check(op, "zeros", zeros, torch.uint8 if zero_kind == "int" else torch.float32, (n, groups))
    if bias is not None:
        _check(op, "bias", bias, torch.float32, (n,))
    return n, k, groups


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


# ---- kernels ----------------------------------------------------------------------------------------
_TENSOR, _F32, _EMPTY = torch.Tensor, torch.float32, torch.empty


class _Bound:
    """A kernel with its weight planes checked and their pointers taken once (what a compiled graph holds);
    calling it checks only x.  The planes are kept referenced and must not be resized.

    A call is Python overhead on top of the kernel, which at decode (one row of x, a small weight) is
    most of the time, so the common case (a contiguous float32 CPU matrix) takes a short path: a few
    attribute checks, the output allocation and one ctypes call; anything else goes through `_rows`."""

    op = ""

    def _bind(self, n: int, k: int, planes: tuple, function: str, args: tuple) -> None:
        self.n, self.k, self._planes, self._args = n, k, planes, args
        self._function = getattr(library(), function)

    def _run(self, x_ptr: int, m: int, out_ptr: int) -> int:
        return self._function(x_ptr, m, self.k, *self._args, out_ptr)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.__class__ is _TENSOR and x.dtype is _F32 and x.is_cpu and x.is_contiguous():
            shape = x.shape
            if len(shape) == 2 and shape[1] == self.k:
                m = shape[0]
                out = _EMPTY(m, self.n)  # the default dtype is float32 unless someone changed it
                if out.dtype is not _F32:
                    out = _EMPTY(m, self.n, dtype=_F32)
                if self._run(x.data_ptr(), m, out.data_ptr()) != 0:
                    raise MemoryError(f"{self.op}: out of memory for scratch space")
                return out
        rows = _rows(self.op, x, self.k)
        out = torch.empty(rows.shape[0], self.n, dtype=torch.float32)
        if self._run(rows.data_ptr(), rows.shape[0], out.data_ptr()) != 0:
            raise MemoryError(f"{self.op}: out of memory for scratch space")
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.n)


class Int4Linear(_Bound):
    """x -> x @ W.T + bias for 4-bit planes in this module's layout; activations quantized to int8 per row
    and group inside the kernel."""

    op = "int4_linear"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, group: int, zero_kind: str, level: str = "best"):
        n, k, _ = _check_int4(self.op, codes, scales, zeros, bias, group, zero_kind)
        self._bind(n, k, (codes, scales, zeros, bias), "fxp_int4_linear",
                   (codes.data_ptr(), scales.data_ptr(), _ptr(zeros), _ptr(bias), n, group, ZERO_KINDS[zero_kind],
                    _level(self.op, level)))


GEMM_MIN_K = 8  # torch._int_mm (CPU, torch 2.13) returns wrong values at K = 1


@functools.lru_cache(maxsize=None)
def has_amx() -> bool:
    """The CPU has AMX int8 tiles (Linux: the `amx_int8` flag in /proc/cpuinfo)."""
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False


def gemm_rows() -> int:
    """Rows of x from which `Int8Linear` runs oneDNN's int8 GEMM instead of the C kernel: 16 with AMX, else
    32 (on AVX-512-VNNI, at 16 rows the two are level and from 32 on the GEMM is 1.5-2x faster)."""
    return 16 if has_amx() else 32


class Int8Linear(_Bound):
    """x -> x @ (wscale[:, None] * wq).T + bias; wq int8 (N, K) (any int8 value), wscale float32 (N,);
    activations quantized to int8 per row inside the kernel, or in torch before oneDNN's int8 GEMM from
    `gemm_rows()` rows on (the same output)."""

    op = "int8_linear"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.__class__ is _TENSOR and x.dtype is _F32 and x.is_cpu and x.dim() >= 2 and x.shape[-1] == self.k \
                and self.uses_gemm(x.numel() // self.k):
            return self.gemm(x)
        return super().__call__(x)

    def uses_gemm(self, rows: int) -> bool:
        """Whether x of `rows` rows goes through oneDNN's int8 GEMM."""
        return bool(self._gemm_from) and rows >= self._gemm_from

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The oneDNN path: per-row int8 activations, torch._int_mm, then (sx * wscale) * dot + bias."""
        wq, wscale, bias = self._planes
        rows = x.reshape(-1, self.k).contiguous()
        qx, sx = quantize_activations(rows, self.k)
        y = torch._int_mm(qx, wq.t()).float() * (sx * wscale)
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], self.n)

    def __init__(self, wq: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None, level: str = "best"):
        if not isinstance(wq, torch.Tensor) or wq.dim() != 2:
            raise LoweringError(f"{self.op}: `wq` must be an int8 tensor (N, K)")
        n, k = wq.shape
        _check(self.op, "wq", wq, torch.int8, (n, k))
        _check(self.op, "wscale", wscale, torch.float32, (n,))
        if bias is not None:
            _check(self.op, "bias", bias, torch.float32, (n,))
        self._bind(n, k, (wq, wscale, bias), "fxp_int8_linear",
                   (wq.data_ptr(), wscale.data_ptr(), _ptr(bias), n, _level(self.op, level)))
        # the same arguments in one struct, so a call passes 4 (ctypes converts each argument every call),
        # and `_run` a C-level partial (no Python frame) that shadows the method
        self._bound = _Int8Bound(wq.data_ptr(), wscale.data_ptr(), _ptr(bias), n, k, _level(self.op, level), 0)
        self._run = functools.partial(library().fxp_int8_linear_bound, ctypes.addressof(self._bound))
        self._gemm_from = gemm_rows() if level == "best" and k >= GEMM_MIN_K else 0  # 0: always the C kernel


class _Int8Bound(ctypes.Structure):
    """`fxp_int8_bound` in quant_kernels.c."""

    _fields_ = [("wq", _P), ("scales", _P), ("bias", _P), ("n", _I), ("k", _I), ("level", ctypes.c_int32),
                ("reserved", ctypes.c_int32)]


class CodebookLinear(_Bound):
    """x -> x @ W.T + bias with W = scales * codebook[codes] + offsets per group (4-bit codes in this
    module's layout, codebook float32 (16,) for the tensor, offsets optional)."""

    op = "codebook_linear"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 codebook: torch.Tensor, bias: torch.Tensor | None, group: int, level: str = "best"):
        n, k, groups = _int4_shapes(self.op, codes, group)
        _check(self.op, "codes", codes, torch.uint8, (n, k // 2))
        _check(self.op, "scales", scales, torch.float32, (n, groups))
        _check(self.op, "codebook", codebook, torch.float32, (16,))
        if offsets is not None:
            _check(self.op, "offsets", offsets, torch.float32, (n, groups))
        if bias is not None:
            _check(self.op, "bias", bias, torch.float32, (n,))
        self._bind(n, k, (codes, scales, offsets, codebook, bias), "fxp_codebook_linear",
                   (codes.data_ptr(), scales.data_ptr(), _ptr(offsets), codebook.data_ptr(), _ptr(bias), n, group,
                    _level(self.op, level)))


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, group: int, zero_kind: str, level: str = "best") -> torch.Tensor:
    """y (..., N) = x (..., K) @ W.T + bias, W from 4-bit codes in the layout of this module's docstring;
    activations quantized to int8 per row and group inside the kernel (`Int4Linear` binds the weight once)."""
    return Int4Linear(codes, scales, zeros, bias, group, zero_kind, level)(x)


def int8_linear(x: torch.Tensor, wq: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None,
                level: str = "best") -> torch.Tensor:
    """y (..., N) = x (..., K) @ (wscale[:, None] * wq).T + bias (`Int8Linear` binds the weight once)."""
    return Int8Linear(wq, wscale, bias, level)(x)


def codebook_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                    codebook: torch.Tensor, bias: torch.Tensor | None, group: int,
                    level: str = "best") -> torch.Tensor:
    """y (..., N) = x (..., K) @ W.T + bias, W = scales * codebook[codes] + offsets (`CodebookLinear`
    binds the weight once)."""
    return CodebookLinear(codes, scales, offsets, codebook, bias, group, level)(x)


# ---- references (torch, the same integer math) ------------------------------------------------------
def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 -> (qx int8 (M, K), sx float32 (M, K / group)), exactly as the kernels do it."""
    m, k = x.shape
    xg = x.reshape(m, k // group, group)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    qx = (xg * inv[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(m, k)
    return qx, amax / 127.0


def activation_error_bound(x: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
    """(M, N) bound on |kernel - x @ weight.T| from activation rounding: |x_hat - x| <= sx / 2 per value,
    so the error is at most 1/2 sum_g sx_g |weight_n,g|_1 (weight: the dequantized float weight)."""
    m, k = x.shape
    _, sx = quantize_activations(x, group)
    norms = weight.abs().reshape(weight.shape[0], k // group, group).sum(-1)
    return 0.5 * sx.double() @ norms.double().T


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 (N, K / 2) -> q uint8 (N, K), low nibble first."""
    return torch.stack((codes & 15, codes >> 4), dim=-1).reshape(codes.shape[0], -1)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                    zero_kind: str) -> torch.Tensor:
    """The float32 weight (N, K) the packed planes stand for."""
    q = unpack_int4(codes).float()
    n, k = q.shape
    s = scales.repeat_interleave(group, 1)
    if zero_kind == "float":
        return s * q + zeros.repeat_interleave(group, 1)
    z = zeros.float().repeat_interleave(group, 1) if zero_kind == "int" else 8.0
    return s * (q - z)


def reference_int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                          bias: torch.Tensor | None, group: int, zero_kind: str) -> torch.Tensor:
    """int4_linear in torch: the same activation quantization and exact per-group integer dot products,
    combined in float64 (the kernels combine in float32, so they agree to float rounding)."""
    n, k = codes.shape[0], codes.shape[1] * 2
    rows = x.reshape(-1, k).float()
    qx, sx = quantize_activations(rows, group)
    groups = k // group
    qg = unpack_int4(codes).double().reshape(n, groups, group)
    xg = qx.double().reshape(-1, groups, group)
    dot = torch.einsum("mgk,ngk->mng", xg, qg)                 # exact: |values| < 2^53
    s = (sx[:, None, :] * scales[None, :, :]).double()          # float32 product, as the kernels form it
    if zero_kind == "float":
        offset = (sx[:, None, :] * zeros[None, :, :]).double()
        y = (s * dot + offset * xg.sum(-1)[:, None, :]).sum(-1)
    else:
        z = zeros.double() if zero_kind == "int" else torch.full((n, groups), 8.0, dtype=torch.float64)
        y = (s * (dot - z[None] * xg.sum(-1)[:, None, :])).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.float().view(*x.shape[:-1], n)


def reference_int8_linear(x: torch.Tensor, wq: torch.Tensor, wscale: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """int8_linear in torch: per-row activation quantization, exact integer dot, float64 combination."""
    n, k = wq.shape
    qx, sx = quantize_activations(x.reshape(-1, k).float(), k)
    dot = qx.double() @ wq.double().T
    y = (sx * wscale[None, :]).double() * dot
    if bias is not None:
        y = y + bias.double()
    return y.float().view(*x.shape[:-1], n)


def dequantize_codebook(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                        codebook: torch.Tensor, group: int) -> torch.Tensor:
    """W = scales * codebook[q] + offsets, float32 (N, K), rounded as the kernel rounds it."""
    w = scales.repeat_interleave(group, 1) * codebook[unpack_int4(codes).long()]
    return w if offsets is None else w + offsets.repeat_interleave(group, 1)


def reference_codebook_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                              offsets: torch.Tensor | None, codebook: torch.Tensor, bias: torch.Tensor | None,
                              group: int) -> torch.Tensor:
    """codebook_linear in torch: the dequantized weight, then a float64 product."""
    w = dequantize_codebook(codes, scales, offsets, codebook, group)
    y = x.double() @ w.double().T
    return (y if bias is None else y + bias.double()).float()


# ---- packers for tests and benchmarks (round to nearest) ----------------------------------------------
class Int4Weight(NamedTuple):
    """Packed 4-bit planes in this module's layout."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group: int
    zero_kind: str


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers in [0, 15] -> codes uint8 (N, K / 2), low nibble = even k."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def pack_rtn_int4(weight: torch.Tensor, group: int, zero_kind: str) -> Int4Weight:
    """Round-to-nearest 4-bit packing of a float weight (N, K), a helper for tests and benchmarks:
    sym scale = max|w| / 7; int and float use min / max per group (int rounds the zero point)."""
    n, k = weight.shape
    _int4_shapes("pack_rtn_int4", torch.empty(n, k // 2, dtype=torch.uint8), group)
    w = weight.detach().float().reshape(n, k // group, group)
    if zero_kind == "sym":
        scale = (w.abs().amax(-1) / 7).clamp_min(1e-12)
        q, zeros = (w / scale[..., None]).round().clamp(-8, 7) + 8, None
    else:
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-12)
        if zero_kind == "int":
            zero = (-low / scale).round().clamp(0, 15)
            q, zeros = ((w / scale[..., None]).round() + zero[..., None]).clamp(0, 15), zero.to(torch.uint8)
        elif zero_kind == "float":
            q, zeros = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15), low.contiguous()
        else:
            raise LoweringError(f"pack_rtn_int4: unknown `zero_kind` {zero_kind!r}; "
                                f"choose one of {', '.join(ZERO_KINDS)}")
    return Int4Weight(pack_int4(q.reshape(n, k)), scale.contiguous(), zeros, group, zero_kind)


def pack_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 (scale = max|w| / 127), a helper for tests and benchmarks."""
    scale = (weight.detach().float().abs().amax(1) / 127).clamp_min(1e-12)
    return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.contiguous()


def pack_codebook(weight: torch.Tensor, codebook: torch.Tensor, group: int) -> Int4Weight:
    """Nearest-level codes for a codebook in [0, 1] with scale = max - min and offset = min per group
    (the paper's bucket scaling), a helper for tests and benchmarks; zero_kind 'float' holds the offsets."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group, group)
    low, high = w.amin(-1), w.amax(-1)
    scale = (high - low).clamp_min(1e-12)
    t = (w - low[..., None]) / scale[..., None]
    q = (t[..., None] - codebook).abs().argmin(-1)
    return Int4Weight(pack_int4(q.reshape(n, k)), scale.contiguous(), low.contiguous(), group, "float")
