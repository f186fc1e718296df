"""TVM lowering rules for the binary ops that ``binarize`` and ``xnor-mst`` insert.

``fxpress::binary_linear``, ``binary_conv2d``, ``binary_linear_mst`` and
``binary_conv2d_mst`` (see :mod:`fxpress.ops.binary`) become TIR
functions that are integer-exact up to the float ``scale``/``bias``::

    P[b, cw, y*Wp + x] = sign bits of x[b, 32cw : 32cw+32, y - ph, x - pw], 0 off the input  (uint32)
    Wt[ky, kx, cw, n]  = sign bits of W[n, 32cw : 32cw+32, ky, kx]                          (uint32)
    acc[b, oy, ox, n]  = sum_{ky,kx,cw} popcount(P[b, cw, pixel of tap (ky, kx)] ^ Wt[ky, kx, cw, n])
    out[b, n, oy, ox]  = (offset - 2 * acc) * scale[n] + bias[n]

A bit is set where the value is -1 (``!(v >= 0)``: NaN is -1, as in eager).
K is packed tap-major (each pixel's channels in ceil(C/32) words) as the
native kernels do: a pixel is packed once, not once per tap, and the GEMM
reads packed pixels directly (implicit im2col).  Bits past C are 0 in both
operands.  A linear layer is a 1x1 convolution on (M, K, 1, 1).  32-bit words:
a 512-bit ``vpopcntd`` covers 16 channels (8 with 64-bit words), sums are int32.

Zero padding: padded pixels of P are 0 (read as +1), so they add the weight's
-1 bits at padded taps to the popcount.  Instead of masking every word, the
true dot ``K_valid - 2 popcount(valid bits)`` is recovered with a per-(n, oy, ox)
``offset = K_valid + 2 * (-1 weight bits at padded taps)`` computed from the
weights alone; without padding ``offset = K``.

Weight packing and the offset depend only on parameters: ``LiftTransformParams``
moves them to load time.  The pack is injective (FuseOps fuses a preceding
batch norm into it; the Injective rule vectorizes it over pixels).  The pad
and the popcount GEMM (a reduction no CPU rule matches) are emitted already
scheduled (``tirx.is_scheduled``) and opaque, so fusion leaves them whole:
acc in MR x NR tiles (MR output positions unrolled, NR channels vectorized),
the epilogue per tile, tiles in parallel.  Those schedules are for CPUs
(llvm); ``c`` (no vector types) and ``cuda`` (no thread binding) cannot build them.

MST forms: replaying the plan gives every channel y_j = sign(W_j) . sign(x),
the integers of a direct XNOR dot with the unpacked weights, so every channel
is computed directly from ``packed_weight`` and the plan is not replayed: the
replay adds one position across rows at a time instead of 512 weight bits per
popcount instruction, slower on CPUs with vector popcount (docs/binary.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxpress.backends.tvm.rules import RuleContext, register_lowering, relax_shape, rows_as_one_var, static_int
from fxpress.errors import LoweringError

WORD = 32  # bits per packed word: 16 lanes of vpopcntd per 512-bit vector, int32 sums
BITS = f"uint{WORD}"
PACKED_WORD = 64  # xnor-mst's packed_weight words (int64)
ROW_TILES = [6, 4, 8, 5, 7, 3, 2]  # MR: output positions per register tile (unrolled)
COLUMN_TILES = [32, 16, 8]  # NR: output channels per register tile (vectorized)


@dataclass(frozen=True)
class ConvGeometry:
    """Static sizes of one binary convolution (a linear layer: 1x1 kernel on 1x1 pixels)."""

    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def words(self) -> int:
        return math.ceil(self.channels / WORD)

    @property
    def k(self) -> int:
        return self.channels * self.kernel[0] * self.kernel[1]

    @property
    def out_h(self) -> int:
        return self._out_size(self.height, 0)

    @property
    def out_w(self) -> int:
        return self._out_size(self.width, 1)

    def _out_size(self, size: int, axis: int) -> int:
        span = self.dilation[axis] * (self.kernel[axis] - 1) + 1
        return (size + 2 * self.padding[axis] - span) // self.stride[axis] + 1


# -- TE computes ---------------------------------------------------------------------------
def _negative(value):
    """1 where !(value >= 0), i.e. sign -1 (NaN included), else 0."""
    from tvm import tirx

    return tirx.Select(value >= tirx.const(0, value.dtype), tirx.const(0, BITS), tirx.const(1, BITS))


def _channel_word(bit_of, cw, channels: int, words: int):
    """OR of bit_of(c) << (c % 32) over the channels c of word cw (bits past `channels` stay 0)."""
    from tvm import te, tirx

    word = tirx.const(0, BITS)
    for bit in range(min(WORD, channels)):
        if words == 1:
            term = bit_of(bit)
        elif channels % WORD == 0:
            term = bit_of(cw * WORD + bit)
        else:
            c = cw * WORD + bit
            term = tirx.Select(c < channels, bit_of(te.min(c, channels - 1)), tirx.const(0, BITS))
        word = word | (term << tirx.const(bit, BITS))
    return word


def pack_activations(x, geometry: ConvGeometry):
    """(B, C, H, W) float -> (B, ceil(C/32), H * W) uint32 sign words (pixels flattened, so the
    injective schedule vectorizes over a whole plane)."""
    from tvm import te

    width = geometry.width

    def word(b, cw, pixel):
        return _channel_word(lambda c: _negative(x[b, c, pixel // width, pixel % width]), cw,
                             geometry.channels, geometry.words)

    return te.compute((x.shape[0], geometry.words, geometry.height * width), word, name="binary_pack")


def pad_words(p, geometry: ConvGeometry):
    """(B, CW, H * W) -> (B, CW, (H + 2ph) * (W + 2pw)) words, 0 (read as +1) in the padding."""
    from tvm import te, tirx

    height, width, (ph, pw) = geometry.height, geometry.width, geometry.padding
    padded_width = width + 2 * pw

    def word(b, cw, pixel):
        iy, ix = pixel // padded_width - ph, pixel % padded_width - pw
        inside = tirx.all(iy >= 0, iy < height, ix >= 0, ix < width)
        clamped = te.max(te.min(iy, height - 1), 0) * width + te.max(te.min(ix, width - 1), 0)
        return tirx.Select(inside, p[b, cw, clamped], tirx.const(0, BITS))

    return te.compute((p.shape[0], p.shape[1], (height + 2 * ph) * padded_width), word, name="binary_pad")


def pack_float_weight(weight, geometry: ConvGeometry):
    """Latent weight (N, C, kh, kw) -> (kh, kw, ceil(C/32), N) uint32 sign words."""
    from tvm import te

    kh, kw = geometry.kernel
    return te.compute((kh, kw, geometry.words, weight.shape[0]), lambda ky, kx, cw, n: _channel_word(
        lambda c: _negative(weight[n, c, ky, kx]), cw, geometry.channels, geometry.words),
        name="binary_weight")


def repack_bit_weight(packed, geometry: ConvGeometry):
    """int64 (N, ceil(K/64)), K in PyTorch order (c, ky, kx) -> (kh, kw, ceil(C/32), N) uint32."""
    from tvm import te, tirx

    kh, kw = geometry.kernel

    def bit_at(n, c, ky, kx):
        k = (c * kh + ky) * kw + kx
        word = tirx.reinterpret("uint64", packed[n, k // PACKED_WORD])
        return ((word >> tirx.Cast("uint64", k % PACKED_WORD)) & tirx.const(1, "uint64")).astype(BITS)

    return te.compute((kh, kw, geometry.words, packed.shape[0]), lambda ky, kx, cw, n: _channel_word(
        lambda c: bit_at(n, c, ky, kx), cw, geometry.channels, geometry.words), name="binary_weight")


def _tap_axes(geometry: ConvGeometry) -> tuple:
    """Reduction axes over a patch: kernel rows, kernel columns, channel words."""
    from tvm import te

    sizes = (*geometry.kernel, geometry.words)
    return tuple(te.reduce_axis((0, size), name) for size, name in zip(sizes, ("ky", "kx", "cw")))


def padding_offset(wt, geometry: ConvGeometry):
    """(N, OH, OW) int32: K_valid + 2 * (weight -1 bits at padded taps), see the module docstring."""
    from tvm import te, tirx

    ky, kx, cw = _tap_axes(geometry)
    height, width = geometry.height, geometry.width

    def offset(n, oy, ox):
        iy = oy * geometry.stride[0] - geometry.padding[0] + ky * geometry.dilation[0]
        ix = ox * geometry.stride[1] - geometry.padding[1] + kx * geometry.dilation[1]
        inside = tirx.all(iy >= 0, iy < height, ix >= 0, ix < width)
        channels_in_word = te.min(geometry.channels - cw * WORD, WORD)
        padded = 2 * tirx.popcount(wt[ky, kx, cw, n]).astype("int32")
        return te.sum(tirx.Select(inside, channels_in_word, padded), axis=[ky, kx, cw])

    return te.compute((wt.shape[3], geometry.out_h, geometry.out_w), offset, name="binary_offset")


def popcount_gemm(p, wt, offset, scale, bias, geometry: ConvGeometry, dtype: str):
    """acc (B, OH, OW, N) int32 popcount sums, then out (B, N, OH, OW) in `dtype`."""
    from tvm import te, tirx

    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    ky, kx, cw = _tap_axes(geometry)
    channels, out_h, out_w = wt.shape[3], geometry.out_h, geometry.out_w
    padded_width = geometry.width + 2 * geometry.padding[1]

    def pixel(oy, ox):
        return (oy * sh + ky * dh) * padded_width + ox * sw + kx * dw

    acc = te.compute((p.shape[0], out_h, out_w, channels), lambda b, oy, ox, n: te.sum(
        tirx.popcount(p[b, cw, pixel(oy, ox)] ^ wt[ky, kx, cw, n]).astype("int32"),
        axis=[ky, kx, cw]), name="acc")

    def affine(b, n, oy, ox):
        base = offset[n, oy, ox] if offset is not None else tirx.const(geometry.k, "int32")
        value = (base - 2 * acc[b, oy, ox, n]).astype(dtype)
        if scale is not None:
            value = value * scale[n].astype(dtype)
        if bias is not None:
            value = value + bias[n].astype(dtype)
        return value

    return acc, te.compute((p.shape[0], channels, out_h, out_w), affine, name="out")


# -- the scheduled popcount GEMM ---------------------------------------------------------------
def schedule_popcount_gemm(func, row_axis: int, rows, channels: int):
    """Register-tile ``acc`` (rows of `row_axis` x channels), epilogue per tile, tiles in parallel."""
    from tvm import s_tir

    from fxpress.backends.tvm.schedule_utils import pick_factor

    sch = s_tir.Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    *spatial, n, ky, kx, cw = sch.get_loops(acc)
    mr = pick_factor(rows, ROW_TILES) or ROW_TILES[1]
    nr = pick_factor(channels, COLUMN_TILES) or min(channels, COLUMN_TILES[0])
    r_out, r_in = sch.split(spatial[row_axis], [None, mr])
    n_out, n_in = sch.split(n, [None, nr])
    outer = [*spatial[:row_axis], r_out, *spatial[row_axis + 1:]]
    sch.reorder(*outer, n_out, ky, kx, cw, r_in, n_in)
    sch.set_scope(acc, 0, "global")  # a small "global" tile is a stack array, "local" a workspace call
    sch.reverse_compute_at(out, n_out)
    sch.parallel(sch.fuse(*outer, n_out))  # before decompose_reduction: the checks refuse it after
    sch.unroll(r_in)
    sch.vectorize(n_in)
    sch.vectorize(sch.get_loops(out)[-1])
    init = sch.decompose_reduction(acc, ky)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


def _static(size, what: str, node: torch.fx.Node) -> int:
    return static_int(node, size, what, "only the batch may be dynamic, or use --target native")


def schedule_pad(func):
    """Tiles of words: (b, cw) in parallel."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    b, cw, _ = sch.get_loops(sch.get_sblock("binary_pad"))
    sch.parallel(sch.fuse(b, cw))
    return sch.mod["main"]


def _emit_popcount_conv(ctx: RuleContext, node: torch.fx.Node, x4, wt, geometry: ConvGeometry, scale, bias,
                        name: str):
    """x4 (B, C, H, W), packed weights -> out (B, N, OH, OW): pack, pad, GEMM.  The pad is its own
    opaque function: fused into the pack, its clamped reads made the pack 10x slower."""
    dtype = str(x4.ty.dtype)
    p = ctx.emit_te(lambda x: pack_activations(x, geometry), x4, name=f"{name}_pack")
    offset = None
    if any(geometry.padding):
        p = ctx.emit_scheduled(lambda p: pad_words(p, geometry), {"p": p}, schedule_pad, f"{name}_pad")
        offset = ctx.emit_te(lambda w: padding_offset(w, geometry), wt, name=f"{name}_offset")
    batch, channels = relax_shape(x4)[0], _static(relax_shape(wt)[3], "output channels", node)
    batch = int(batch) if hasattr(batch, "value") else batch  # symbolic when the batch is dynamic
    row_axis, rows = (2, geometry.out_w) if geometry.out_w > 1 else (0, batch)

    def compute(p, wt, offset, scale, bias):
        return popcount_gemm(p, wt, offset, scale, bias, geometry, dtype)[1]

    inputs = {"p": p, "wt": wt, "offset": offset, "scale": scale, "bias": bias}
    return ctx.emit_scheduled(compute, inputs, lambda f: schedule_popcount_gemm(f, row_axis, rows, channels),
                           f"{name}_gemm")


def _conv_geometry(x, kernel, stride, padding, dilation, node: torch.fx.Node) -> ConvGeometry:
    _, channels, height, width = relax_shape(x)
    geometry = ConvGeometry(_static(channels, "input channels", node), _static(height, "input height", node),
                            _static(width, "input width", node), tuple(int(v) for v in kernel),
                            tuple(int(v) for v in stride), tuple(int(v) for v in padding),
                            tuple(int(v) for v in dilation))
    if geometry.out_h < 1 or geometry.out_w < 1:
        raise LoweringError(f"{node.target} at node {node.name}: input {height}x{width} is smaller than "
                            f"the kernel {list(kernel)} with padding {list(padding)}")
    return geometry


def _check_weight(weight, geometry: ConvGeometry, node: torch.fx.Node, packed: bool, linear: bool = False):
    """The weight fits the input: float (N, C, kh, kw) or (N, K); packed: int64 (N, ceil(K/64))."""
    shape = [_static(v, "weight shape", node) for v in relax_shape(weight)]
    dtype = str(weight.ty.dtype)
    if packed:
        words = math.ceil(geometry.k / PACKED_WORD)
        fits, expected = shape[1:] == [words] and dtype == "int64", f"int64 (N, {words}) for K={geometry.k}"
    else:
        dims = [geometry.channels] if linear else [geometry.channels, *geometry.kernel]
        fits = shape[1:] == dims and dtype.startswith(("float", "bfloat"))
        expected = f"float (N, {', '.join(map(str, dims))}) (groups=1)"
    if not fits:
        what = "packed_weight" if packed else "weight"
        raise LoweringError(f"{node.target} at node {node.name}: {what} {dtype}{shape} does not fit the input "
                            f"({expected} expected); re-run binarize / xnor-mst on the graph")


# -- the rules -----------------------------------------------------------------------------------
@register_lowering("fxpress::binary_conv2d")
def lower_binary_conv2d(ctx: RuleContext, node: torch.fx.Node):
    """conv2d(sign(x), sign(W)) * scale + bias -> pack, weight pack (load time), popcount GEMM."""
    x, weight, scale, bias, stride, padding, dilation = ctx.args(node)[:7]
    geometry = _conv_geometry(x, relax_shape(weight)[2:], stride, padding, dilation, node)
    _check_weight(weight, geometry, node, packed=False)
    wt = ctx.emit_te(lambda w: pack_float_weight(w, geometry), weight, name="fxpress_binary_weight")
    return _emit_popcount_conv(ctx, node, x, wt, geometry, scale, bias, "fxpress_binary_conv2d")


@register_lowering("fxpress::binary_conv2d_mst")
def lower_binary_conv2d_mst(ctx: RuleContext, node: torch.fx.Node):
    """binary_conv2d from packed_weight directly (the plan is not replayed: same integers)."""
    x, packed, _plan, scale, bias, kernel, stride, padding, dilation = ctx.args(node)[:9]
    geometry = _conv_geometry(x, kernel, stride, padding, dilation, node)
    _check_weight(packed, geometry, node, packed=True)
    wt = ctx.emit_te(lambda w: repack_bit_weight(w, geometry), packed, name="fxpress_binary_weight")
    return _emit_popcount_conv(ctx, node, x, wt, geometry, scale, bias, "fxpress_binary_conv2d")


def _emit_linear(ctx: RuleContext, x, make_wt, scale, bias, node: torch.fx.Node):
    """(..., K) -> (M, K, 1, 1), the 1x1 popcount conv, -> (..., N)."""
    from tvm import relax

    *lead, k = relax_shape(x)
    geometry = ConvGeometry(_static(k, "in_features", node), 1, 1, (1, 1))
    rows = math.prod(lead) if lead else 1
    if hasattr(rows, "value") or isinstance(rows, int):
        x4 = ctx.bb.emit(relax.op.reshape(x, [rows, geometry.channels, 1, 1]))
    else:  # a product of dynamic dims: one variable, so PrimFuncs can bind it
        x4 = rows_as_one_var(ctx.bb, x, [rows, geometry.channels, 1, 1], "rows")
    wt = make_wt(geometry)
    out = _emit_popcount_conv(ctx, node, x4, wt, geometry, scale, bias, "fxpress_binary_linear")
    return ctx.bb.emit(relax.op.reshape(out, [*lead, relax_shape(wt)[3]]))


@register_lowering("fxpress::binary_linear")
def lower_binary_linear(ctx: RuleContext, node: torch.fx.Node):
    """(sign(x) @ sign(W).T) * scale + bias -> pack, weight pack (load time), popcount GEMM."""
    from tvm import relax

    x, weight, scale, bias = ctx.args(node)[:4]

    def make_wt(geometry: ConvGeometry):
        _check_weight(weight, geometry, node, packed=False, linear=True)
        weight4 = ctx.bb.emit(relax.op.reshape(weight, [relax_shape(weight)[0], geometry.channels, 1, 1]))
        return ctx.emit_te(lambda w: pack_float_weight(w, geometry), weight4, name="fxpress_binary_weight")

    return _emit_linear(ctx, x, make_wt, scale, bias, node)


@register_lowering("fxpress::binary_linear_mst")
def lower_binary_linear_mst(ctx: RuleContext, node: torch.fx.Node):
    """binary_linear from packed_weight directly (the plan is not replayed: same integers)."""
    x, packed, _plan, scale, bias = ctx.args(node)[:5]

    def make_wt(geometry: ConvGeometry):
        _check_weight(packed, geometry, node, packed=True)
        return ctx.emit_te(lambda w: repack_bit_weight(w, geometry), packed, name="fxpress_binary_weight")

    return _emit_linear(ctx, x, make_wt, scale, bias, node)
