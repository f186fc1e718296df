"""Quantized linear kernels (fxpress/ops/quant_kernels.c): every path against the integer reference, the
activation-rounding bound against float F.linear, the packers' layout, and clear errors for bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxpress.errors import LoweringError
from fxpress.ops import native_quant as nq

torch.set_num_threads(1)
PATHS = ["scalar", "avx2", "avx512vnni", "best"]  # a path the CPU lacks falls back to the best it has
# (M, N, K, group): rows and outputs off the vector widths, K an odd number of groups (a trailing 32-block
# when group is 32), 8-group chunks with tails (9 and 18 groups), groups of 3 64-blocks (192), of 3
# 32-blocks (96) and of 10 32-blocks (320, past the AVX2 path's int16 sums over 8 blocks).
INT4_SHAPES = [(1, 13, 96, 32), (7, 37, 320, 64), (7, 9, 384, 128), (1, 19, 288, 32), (3, 5, 576, 32),
               (1, 3, 1152, 128), (2, 5, 960, 320), (5, 7, 576, 192), (2, 5, 480, 96), (1, 4, 2560, 320)]


def weight_and_input(n: int, k: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.1
    x = torch.randn(m, k, generator=generator)
    x[0, :32] = 0.0  # a group of zeros: scale 0, no division by zero
    return weight, x, torch.randn(n, generator=generator)


def assert_matches_reference(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding of the per-group combination: one integer unit off in a group's dot
    product moves the output by scale * sx (~1e-3 here), far above this tolerance."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()) + 1e-6)


@pytest.mark.parametrize("level", PATHS)
@pytest.mark.parametrize("zero_kind", ["sym", "int", "float"])
@pytest.mark.parametrize("m, n, k, group", INT4_SHAPES)
def test_int4_paths_equal_the_integer_reference(level, zero_kind, m, n, k, group):
    weight, x, bias = weight_and_input(n, k, m)
    packed = nq.pack_rtn_int4(weight, group, zero_kind)
    for b in (bias, None):
        got = nq.int4_linear(x, packed.codes, packed.scales, packed.zeros, b, group, zero_kind, level)
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert_matches_reference(got, nq.reference_int4_linear(x, packed.codes, packed.scales, packed.zeros, b,
                                                                group, zero_kind))


@pytest.mark.parametrize("level", ["scalar", "avx2"])
@pytest.mark.parametrize("group", [256, 320, 512])
def test_int4_extremes_do_not_saturate(level, group):
    """Codes 15 against activations at +127 (and a zero point 0): each group's dot is 15 * 127 * group exactly."""
    n, k = 3, 2 * group
    codes = torch.full((n, k // 2), 255, dtype=torch.uint8)
    scales, zeros = torch.ones(n, 2), torch.zeros(n, 2, dtype=torch.uint8)
    x = torch.ones(1, k)
    got = nq.int4_linear(x, codes, scales, zeros, None, group, "int", level)
    # sx = 1 / 127 and qx = 127: y = sum_g (1 / 127) * 15 * 127 * group
    torch.testing.assert_close(got, torch.full((1, n), 15.0 * k), rtol=1e-6, atol=0)
    got = nq.int4_linear(-x, codes, scales, zeros, None, group, "int", level)
    torch.testing.assert_close(got, torch.full((1, n), -15.0 * k), rtol=1e-6, atol=0)


@pytest.mark.parametrize("zero_kind", ["sym", "int", "float"])
@pytest.mark.parametrize("m, n, k, group", INT4_SHAPES[:4])
def test_int4_error_against_float_linear_is_the_activation_rounding(zero_kind, m, n, k, group):
    """|y - F.linear(x, W_hat)| <= 1/2 sum_g sx_g |W_hat[n, g]|_1 (W_hat the dequantized weight), plus float slack."""
    weight, x, bias = weight_and_input(n, k, m, seed=1)
    packed = nq.pack_rtn_int4(weight, group, zero_kind)
    dequantized = nq.dequantize_int4(packed.codes, packed.scales, packed.zeros, group, zero_kind)
    got = nq.int4_linear(x, packed.codes, packed.scales, packed.zeros, bias, group, zero_kind)
    error = (got.double() - F.linear(x, dequantized, bias).double()).abs()
    slack = 1e-5 * (x.abs() @ dequantized.abs().T).double() + 1e-5
    assert (error <= nq.activation_error_bound(x, dequantized, group) + slack).all()
    assert error.max() > 0  # activations really are quantized


@pytest.mark.parametrize("zero_kind", ["sym", "int", "float"])
def test_rtn_packing_layout_and_rounding(zero_kind):
    """Value k of a row sits in byte k // 2, low nibble for even k; the RTN weight error is at most scale / 2."""
    q = torch.tensor([[1, 2, 15, 0, 7, 8] + [3] * 26])
    assert nq.pack_int4(q)[0, :3].tolist() == [0x21, 0x0F, 0x87]
    assert torch.equal(nq.unpack_int4(nq.pack_int4(q)), q.to(torch.uint8))
    weight = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    packed = nq.pack_rtn_int4(weight, 64, zero_kind)
    assert packed.codes.shape == (5, 64) and packed.scales.shape == (5, 2)
    dequantized = nq.dequantize_int4(packed.codes, packed.scales, packed.zeros, 64, zero_kind)
    step = packed.scales.repeat_interleave(64, 1)
    assert ((dequantized - weight).abs() <= step / 2 + 1e-6).all()


# ---- int8 x int8 -------------------------------------------------------------------------------------
# One row of x (decode) takes the GEMV path: 4 weight rows at a time plus 1-3 leftover rows, K in steps of 64
# with a trailing 32-block and K % 32 values one by one; other rows go in tiles of 4 and the leftover rows of
# x take the GEMV.  N = 3 has no 4-row tile, N = 13 ends in one, N = 64 prefetches a next tile on every tile.
INT8_SHAPES = [(1, 13, 96), (7, 37, 100), (3, 9, 33), (1, 5, 1000), (5, 4, 7), (1, 64, 576), (1, 3, 64),
               (2, 17, 160), (9, 8, 31)]


@pytest.mark.parametrize("level", PATHS)
@pytest.mark.parametrize("m, n, k", INT8_SHAPES)
def test_int8_paths_equal_the_integer_reference(level, m, n, k):
    weight, x, bias = weight_and_input(n, k, m, seed=3)
    wq, wscale = nq.pack_int8(weight)
    wq[0, : min(k, 40)] = -128  # the full int8 range is exact (|w| = 128 as an unsigned byte)
    wq[-1, : min(k, 40)] = 127
    for b in (bias, None):
        got = nq.int8_linear(x, wq, wscale, b, level)
        assert_matches_reference(got, nq.reference_int8_linear(x, wq, wscale, b))


@pytest.mark.parametrize("level", ["scalar", "avx2"])
@pytest.mark.parametrize("m", [1, 4, 5])
def test_int8_extremes_are_exact(level, m):
    """-128 against negative activations (the GEMV and the row tiles; 4 + 1 weight rows, K = 64 + 32 + 3)."""
    k = 99
    wq = torch.tensor([[-128] * k, [127] * k, [-128] * k, [-127] * k, [-128] * k], dtype=torch.int8)
    got = nq.int8_linear(-torch.ones(m, k), wq, torch.ones(5), None, level)
    row = torch.tensor([128.0, -127.0, 128.0, 127.0, 128.0]) * k
    torch.testing.assert_close(got, row.expand(m, 5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("level", PATHS)
def test_int8_bound_layer_call_paths(level):
    """Int8Linear's short path (a contiguous float32 matrix), batch dims, strided x, no rows, and the
    unbound C entry point all give the reference."""
    weight, x, bias = weight_and_input(21, 160, 6, seed=6)
    wq, wscale = nq.pack_int8(weight)
    wq[3, :50] = -128
    layer = nq.Int8Linear(wq, wscale, bias, level)
    expected = nq.reference_int8_linear(x, wq, wscale, bias)
    assert_matches_reference(layer(x), expected)
    assert_matches_reference(layer(x[:1]), expected[:1])
    got = layer(x.view(2, 3, 160))
    assert got.shape == (2, 3, 21)
    assert torch.equal(got.reshape(6, 21), layer(x))
    strided = torch.randn(160, 3).T  # (3, 160), not contiguous: copied, not refused
    assert_matches_reference(layer(strided), nq.reference_int8_linear(strided.contiguous(), wq, wscale, bias))
    assert layer(torch.empty(0, 160)).shape == (0, 21)
    out = torch.empty(6, 21)
    assert nq.library().fxp_int8_linear(x.data_ptr(), 6, 160, wq.data_ptr(), wscale.data_ptr(), bias.data_ptr(), 21,
                                        nq.LEVELS[level], out.data_ptr()) == 0
    assert torch.equal(out, layer(x))
    with pytest.raises(LoweringError, match="`x`"):
        layer(x.double())
    with pytest.raises(LoweringError, match="`x`"):
        layer(x[:, :96].contiguous())


@pytest.mark.parametrize("m, n, k", [(32, 13, 70), (33, 21, 160), (100, 7, 8), (64, 37, 576)])
def test_int8_batches_on_onednn_give_the_kernels_output(m, n, k):
    """From gemm_rows() rows on, Int8Linear takes the integer product from torch._int_mm (AMX or VNNI): the
    same dot and the same float combination as the C kernel, so the same output, batch dims included."""
    weight, x, bias = weight_and_input(n, k, m, seed=9)
    wq, wscale = nq.pack_int8(weight)
    wq[0, :8] = -128
    rows = max(m, nq.gemm_rows())
    x = x.repeat(-(-rows // m), 1)[:rows]
    for b in (bias, None):
        layer, kernel = nq.Int8Linear(wq, wscale, b), nq.Int8Linear(wq, wscale, b, "avx512vnni")
        assert layer.uses_gemm(rows) and not layer.uses_gemm(nq.gemm_rows() - 1) and not kernel.uses_gemm(rows)
        assert torch.equal(layer(x), kernel(x))
        assert torch.equal(layer(x.view(rows, 1, k)).view(rows, n), kernel(x))
        assert_matches_reference(layer(x), nq.reference_int8_linear(x, wq, wscale, b))
    tiny = nq.Int8Linear(wq[:, :1].contiguous(), wscale, bias)  # K = 1: torch._int_mm is wrong there
    assert not tiny.uses_gemm(rows)
    assert_matches_reference(tiny(x[:, :1].contiguous()), nq.reference_int8_linear(x[:, :1], wq[:, :1], wscale, bias))


@pytest.mark.parametrize("m, n, k", INT8_SHAPES)
def test_int8_error_against_float_linear_is_the_activation_rounding(m, n, k):
    """Per-row activation scale: |y - F.linear(x, W_hat)| <= 1/2 sx |W_hat[n]|_1, plus float slack."""
    weight, x, bias = weight_and_input(n, k, m, seed=4)
    wq, wscale = nq.pack_int8(weight)
    dequantized = wq.float() * wscale[:, None]
    got = nq.int8_linear(x, wq, wscale, bias)
    error = (got.double() - F.linear(x, dequantized, bias).double()).abs()
    slack = 1e-5 * (x.abs() @ dequantized.abs().T).double() + 1e-5
    assert (error <= nq.activation_error_bound(x, dequantized, k) + slack).all()


# ---- codebook -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", PATHS)
@pytest.mark.parametrize("with_offsets", [True, False])
@pytest.mark.parametrize("m, n, k, group", INT4_SHAPES[:5])
def test_codebook_paths_equal_the_dequantized_float_linear(level, with_offsets, m, n, k, group):
    """No activation quantization here: equal to F.linear of the dequantized weight up to float rounding."""
    weight, x, bias = weight_and_input(n, k, m, seed=5)
    codebook = torch.linspace(0, 1, 16) ** 1.5
    packed = nq.pack_codebook(weight, codebook, group)
    offsets = packed.zeros if with_offsets else None
    got = nq.codebook_linear(x, packed.codes, packed.scales, offsets, codebook, bias, group, level)
    expected = nq.reference_codebook_linear(x, packed.codes, packed.scales, offsets, codebook, bias, group)
    dequantized = nq.dequantize_codebook(packed.codes, packed.scales, offsets, codebook, group)
    scale = float((x.abs() @ dequantized.abs().T).max())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * scale + 1e-6)
    if with_offsets:  # the packer's codes reproduce the weight to half the largest codebook gap
        gap = float((codebook[1:] - codebook[:-1]).max())
        assert ((dequantized - weight).abs() <= packed.scales.repeat_interleave(group, 1) * gap / 2 + 1e-6).all()


# ---- the machine and bad input ---------------------------------------------------------------------------
def test_kernels_build_and_report_a_level():
    assert nq.available()
    assert nq.simd_level() in ("avx512vnni", "avx2", "scalar")


def test_batch_dims_and_non_contiguous_activations():
    weight, x, bias = weight_and_input(11, 128, 6)
    packed = nq.pack_rtn_int4(weight, 32, "int")
    args = (packed.codes, packed.scales, packed.zeros, bias, 32, "int")
    batched = x.view(2, 3, 128)
    got = nq.int4_linear(batched, *args)
    assert got.shape == (2, 3, 11)
    assert torch.equal(got.reshape(6, 11), nq.int4_linear(x, *args))
    strided = torch.randn(128, 4).T  # (4, 128), not contiguous: copied, not refused
    assert_matches_reference(nq.int4_linear(strided, *args), nq.reference_int4_linear(strided.contiguous(), *args))


def _int4_args(**changes):
    weight, x, bias = weight_and_input(8, 128, 2)
    packed = nq.pack_rtn_int4(weight, 64, "int")
    args = dict(x=x, codes=packed.codes, scales=packed.scales, zeros=packed.zeros, bias=bias, group=64,
                zero_kind="int")
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, named", [
    (lambda a: {"codes": a["codes"].to(torch.int8)}, "`codes`"),
    (lambda a: {"scales": a["scales"][:, :1].contiguous()}, "`scales`"),
    (lambda a: {"scales": a["scales"].double()}, "`scales`"),
    (lambda a: {"scales": torch.empty(2, 8).T}, "`scales`"),          # right shape, not contiguous
    (lambda a: {"zeros": a["zeros"].float()}, "`zeros`"),
    (lambda a: {"zeros": None}, "`zeros`"),
    (lambda a: {"bias": a["bias"][:5]}, "`bias`"),
    (lambda a: {"group": 96}, "`group`"),                             # does not divide K = 128
    (lambda a: {"group": 48}, "`group`"),                             # not a multiple of 32
    (lambda a: {"x": a["x"].double()}, "`x`"),
    (lambda a: {"x": a["x"][:, :96]}, "`x`"),
    (lambda a: {"zero_kind": "asym"}, "`zero_kind`"),
])
def test_int4_bad_input_gets_one_clear_error(changes, named):
    args = _int4_args()
    args.update(changes(args))
    with pytest.raises(LoweringError, match=named):
        nq.int4_linear(**args)


def test_other_bad_input_gets_one_clear_error():
    args = _int4_args()
    with pytest.raises(LoweringError, match="`level`"):
        nq.int4_linear(**args, level="avx1024")
    with pytest.raises(LoweringError, match="`zeros` must be None"):
        nq.int4_linear(**{**args, "zero_kind": "sym"})
    wq, wscale = nq.pack_int8(torch.randn(4, 64))
    with pytest.raises(LoweringError, match="`wscale`"):
        nq.int8_linear(torch.randn(1, 64), wq, wscale[:3], None)
    with pytest.raises(LoweringError, match="`wq`"):
        nq.int8_linear(torch.randn(1, 64), wq.to(torch.int32), wscale, None)
    with pytest.raises(LoweringError, match="`x`"):
        nq.int8_linear(torch.randn(1, 63), wq, wscale, None)
    packed = nq.pack_codebook(torch.randn(4, 64), torch.linspace(0, 1, 16), 32)
    with pytest.raises(LoweringError, match="`codebook`"):
        nq.codebook_linear(torch.randn(1, 64), packed.codes, packed.scales, None, torch.linspace(0, 1, 8), None, 32)
    with pytest.raises(LoweringError, match="`group`"):
        nq.pack_rtn_int4(torch.randn(4, 96), 64, "int")
