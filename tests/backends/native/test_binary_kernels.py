"""Native binary kernels: exact against a float reference on random shapes; the build helper."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpress.backends.native import build, kernels
from fxpress.errors import LoweringError
from fxpress.ops.binary import ReusePlan, binary_sign, pack_weight, unpack_signs
from fxpress.passes.binary.xnor_mst import hamming_distances, reuse_plan, reuse_tree

torch.set_num_threads(1)
FAST = settings(max_examples=25, deadline=None)


def values(seed: int, *shape: int) -> torch.Tensor:
    """Random floats with exact zeros and negative zeros mixed in (both binarize to +1)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    pick = torch.rand(*shape, generator=generator)
    x[pick < 0.05] = 0.0
    x[(pick >= 0.05) & (pick < 0.1)] = -0.0
    return x


def correlated_weight(seed: int, channels: int, k: int, flip: float = 0.15) -> torch.Tensor:
    """Channels that are noisy copies of a few prototypes (small Hamming distances, some equal)."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(max(1, channels // 4), k, generator=generator)
    rows = prototypes[torch.randint(len(prototypes), (channels,), generator=generator)]
    flips = torch.rand(channels, k, generator=generator) < flip
    return torch.where(flips, -rows, rows)


def dense_int(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (binary_sign(x) @ binary_sign(w).T).to(torch.int32)


@FAST
@given(m=st.integers(1, 70), n=st.integers(1, 37), k=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_xnor_gemm_equals_float_reference(m, n, k, seed):
    x, w = values(seed, m, k), values(seed + 1, n, k)
    got = kernels.xnor_gemm(kernels.pack_signs(x), pack_weight(w), k)
    assert torch.equal(got, dense_int(x, w))


def popcount_reference(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """K - 2 popcount(a_i ^ b_j) in pure torch, bit by bit (int64 words, any bits set)."""
    x = a[:, None, :] ^ b[None, :, :]
    bits = sum((x >> s) & 1 for s in range(64))
    return (k - 2 * bits.sum(-1)).to(torch.int32)


def test_simd_levels_name_the_default_path_and_include_scalar():
    levels = kernels.simd_levels()
    assert "scalar" in levels and kernels.simd_level() in levels
    assert set(levels) <= set(kernels.LEVELS)
    cpuinfo = "/proc/cpuinfo"
    flags = open(cpuinfo).read().split() if os.path.exists(cpuinfo) else []
    if "avx2" in flags and os.environ.get("FXPRESS_NATIVE_PORTABLE") != "1":
        assert "avx2" in levels  # -march=native on an AVX2 CPU builds the AVX2 path
    with pytest.raises(ValueError, match="unknown level"):
        kernels.xnor_gemm(torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64), 64, level="sse9")


@pytest.mark.parametrize("words", [1, 3, 4, 5, 7, 8, 9, 10, 11, 63, 64, 65, 124, 125, 126, 129])
@pytest.mark.parametrize("m, n", [(1, 1), (3, 5), (2, 4), (7, 9), (5, 3)])
def test_every_simd_path_is_bit_exact_on_odd_word_counts_and_tile_edges(words, m, n):
    """Random words (all bits, not just packed signs) at word counts around the vector widths
    (4 words AVX2, 8 AVX-512 and the AVX2 minimum, 124 = one AVX2 byte-count block; tails of 0-3
    words) and rows / columns off the 2x4 tile."""
    generator = torch.Generator().manual_seed(words * 1000 + m * 10 + n)
    a = torch.randint(-2**63, 2**63 - 1, (m, words), dtype=torch.int64, generator=generator)
    b = torch.randint(-2**63, 2**63 - 1, (n, words), dtype=torch.int64, generator=generator)
    expected = popcount_reference(a, b, 64 * words)
    for level in kernels.simd_levels():
        assert torch.equal(kernels.xnor_gemm(a, b, 64 * words, level=level), expected), level
    assert torch.equal(kernels.xnor_gemm(a, b, 64 * words), expected)


@FAST
@given(m=st.integers(1, 11), n=st.integers(1, 13), k=st.integers(1, 70 * 64), seed=st.integers(0, 2**31))
def test_simd_paths_agree_with_scalar_on_packed_signs(m, n, k, seed):
    x, w = values(seed, m, k), values(seed + 1, n, k)
    a, b = kernels.pack_signs(x), pack_weight(w)
    scalar = kernels.xnor_gemm(a, b, k, level="scalar")
    assert torch.equal(scalar, dense_int(x, w))
    for level in kernels.simd_levels():
        assert torch.equal(kernels.xnor_gemm(a, b, k, level=level), scalar), level


def test_all_ones_rows_count_every_bit_and_large_word_counts_do_not_overflow():
    """All-different rows (popcount = K) over many AVX2 byte-count blocks: each byte sums 248 at most."""
    words = 4 * 31 * 3 + 7
    a = torch.full((3, words), -1, dtype=torch.int64)
    b = torch.zeros(5, words, dtype=torch.int64)
    for level in kernels.simd_levels():
        assert torch.equal(kernels.xnor_gemm(a, b, 64 * words, level=level),
                           torch.full((3, 5), -64 * words, dtype=torch.int32)), level
        assert torch.equal(kernels.xnor_gemm(a, a, 64 * words, level=level),
                           torch.full((3, 3), 64 * words, dtype=torch.int32)), level


@FAST
@given(rows=st.integers(1, 9), k=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_native_packing_matches_numpy_packing_and_unpacks(rows, k, seed):
    x = values(seed, rows, k)
    packed = kernels.pack_signs(x)
    assert torch.equal(packed, pack_weight(x))
    assert torch.equal(unpack_signs(packed, k), binary_sign(x))
    transposed = kernels.signs_transposed(x)
    assert transposed.shape[1] % kernels.ROWS == 0 and not transposed[:, rows:].any()
    assert torch.equal(transposed[:, :rows], binary_sign(x).T.to(torch.int8))


conv_cases = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "c_in": st.integers(1, 5), "c_out": st.integers(1, 7),
    "height": st.integers(1, 9), "width": st.integers(1, 9),
    "kernel": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)), "padding": st.tuples(st.integers(0, 2), st.integers(0, 2)),
    "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)), "seed": st.integers(0, 2**31)})


def conv_setup(case: dict):
    x = values(case["seed"], case["batch"], case["c_in"], case["height"], case["width"])
    w = values(case["seed"] + 1, case["c_out"], case["c_in"], *case["kernel"])
    args = (case["stride"], case["padding"], case["dilation"])
    try:
        expected = F.conv2d(binary_sign(x), binary_sign(w), None, *args)
    except RuntimeError:  # the kernel does not fit the padded input
        return None
    return x, w, args, expected.to(torch.int32)


@FAST
@given(case=conv_cases)
def test_binary_conv_im2col_gemm_equals_float_reference(case):
    setup = conv_setup(case)
    if setup is None:
        return
    x, w, args, expected = setup
    shape = kernels.conv_shape(x, case["kernel"], *args)
    ints = kernels.xnor_gemm(kernels.im2col_pack(x, shape), kernels.pack_conv_weight(w), w[0].numel())
    ints = ints.view(shape.batch, shape.out_h, shape.out_w, -1).permute(0, 3, 1, 2)
    correction = kernels.padding_correction(binary_sign(w), shape)
    assert torch.equal(ints if correction is None else ints - correction, expected)


@FAST
@given(case=conv_cases)
def test_mst_conv_kernel_equals_float_reference(case):
    setup = conv_setup(case)
    if setup is None:
        return
    x, w, args, expected = setup
    shape = kernels.conv_shape(x, case["kernel"], *args)
    rows = shape.batch * shape.out_h * shape.out_w
    ints = mst(kernels.im2col_transposed(x, shape), w)[:, :rows]
    assert torch.equal(ints.reshape(-1, shape.batch, shape.out_h, shape.out_w).permute(1, 0, 2, 3), expected)


def plan_for(weight: torch.Tensor, depth_bound: int | None = None) -> ReusePlan:
    negative = ~(weight.reshape(weight.shape[0], -1) >= 0).numpy()
    tree, root, _ = reuse_tree(hamming_distances(negative), depth_bound)
    return reuse_plan(negative, tree, root)


def mst(xt: torch.Tensor, weight: torch.Tensor, depth_bound: int | None = None) -> torch.Tensor:
    """The MST kernel on activations xt (K, padded rows) with weight's plan: (C, padded rows)."""
    plan = plan_for(weight, depth_bound).to_tensor()
    return kernels.mst_reuse(xt, *kernels.kernel_plan(plan, pack_weight(weight)))


@FAST
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 400), bound=st.sampled_from([None, 1, 2, 3]),
       seed=st.integers(0, 2**31))
def test_mst_reuse_kernel_equals_dense(m, n, k, bound, seed):
    x, w = values(seed, m, k), correlated_weight(seed, n, k)
    got = mst(kernels.signs_transposed(x), w, bound)[:, :m]
    assert torch.equal(got.T, dense_int(x, w))


def test_mst_reuse_kernel_over_several_row_tiles_and_long_position_lists():
    x, w = values(0, 2500, 700), correlated_weight(1, 33, 700, flip=0.4)
    got = mst(kernels.signs_transposed(x), w)[:, :2500]
    assert torch.equal(got.T, dense_int(x, w))


def test_kernels_reject_mismatched_inputs():
    with pytest.raises(LoweringError, match="float32"):
        kernels.pack_signs(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(LoweringError, match="same number of words"):
        kernels.xnor_gemm(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64), 64)
    missing = [level for level in kernels.LEVELS if level not in kernels.simd_levels()]
    if missing:
        with pytest.raises(LoweringError, match="no .* path"):
            kernels.xnor_gemm(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64), 64,
                              level=missing[0])
    with pytest.raises(LoweringError, match="padded to 64"):
        kernels.mst_reuse(torch.zeros(3, 10, dtype=torch.int8), torch.tensor([1, 3, 0, -1, 0, 3, 0, 1, 2]),
                          torch.ones(1, dtype=torch.int32))
    with pytest.raises(LoweringError, match="smaller than the kernel"):
        kernels.conv_shape(torch.zeros(1, 1, 2, 2), (3, 3), (1, 1), (0, 0), (1, 1))


def test_build_without_a_compiler_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-cc-fxpress")
    monkeypatch.setenv("FXPRESS_CACHE", str(tmp_path))
    with pytest.raises(LoweringError, match="no C compiler.*install"):
        build.build_library()


def test_library_is_cached_by_source_hash_and_rebuilt_when_the_source_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("FXPRESS_CACHE", str(tmp_path))
    compiler = build.find_compiler()
    first = build.build_library()
    assert first.parent == tmp_path / "native" and first == build.library_path(compiler)
    assert build.build_library() == first  # cached: no rebuild
    changed = tmp_path / "binary_kernels.c"
    changed.write_text(build.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(build, "SOURCE", changed)
    second = build.build_library()
    assert second != first and second.is_file()
    assert np.array_equal(sorted(p.name for p in (tmp_path / "native").glob("*.so")), sorted([first.name, second.name]))


PORTABLE_CHECK = """
import torch
from fxpress.backends.native import kernels
from fxpress.ops.binary import binary_sign, pack_weight
from fxpress.passes.binary.xnor_mst import plan_layer
import platform
baseline = ["scalar", "neon"] if platform.machine() in ("aarch64", "arm64") else ["scalar"]  # NEON is ARMv8-A
assert kernels.simd_level() == baseline[-1] and kernels.simd_levels() == baseline
torch.manual_seed(0)
for m, n, k in ((1, 1, 1), (5, 7, 130), (64, 9, 577)):
    x, w = torch.randn(m, k), torch.randn(n, k)
    expected = (binary_sign(x) @ binary_sign(w).T).to(torch.int32)
    assert torch.equal(kernels.xnor_gemm(kernels.pack_signs(x), pack_weight(w), k), expected)
    plan = plan_layer(w)[0].to_tensor()
    got = kernels.mst_reuse(kernels.signs_transposed(x), *kernels.kernel_plan(plan, pack_weight(w)))
    assert torch.equal(got[:, :m].T, expected)
print("portable ok")
"""


def test_portable_build_without_cpu_specific_instructions_is_exact(tmp_path):
    env = dict(os.environ, FXPRESS_NATIVE_PORTABLE="1", FXPRESS_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "portable ok" in done.stdout, done.stderr[-2000:]
