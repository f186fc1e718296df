"""The XNOR GEMM's NEON path (level 3), cross-compiled for aarch64 and run under qemu-aarch64.

`binary_kernels.c` and the harness `aarch64_xnor_check.c` are built statically with
`aarch64-linux-gnu-gcc`; the harness runs the default path, the scalar path and every other
level 0..7 on the cases this module writes to its stdin and prints the results, which are
compared here with a reference computed in torch on the host.  Its buffers end at PROT_NONE
pages, so an over-read of a or b (a tail off by one) dies with SIGSEGV.  Without the
toolchain or qemu every test skips with the command that installs them.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpress.backends.native.build import SOURCE
from fxpress.ops.binary import binary_sign, pack_weight

HARNESS = Path(__file__).with_name("aarch64_xnor_check.c")
CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
INSTALL = "apt-get install -y qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
# The optimization flags of fxpress.utils.cbuild.BASE_FLAGS (the host build), statically linked.
FLAGS = ("-O3", "-std=c11", "-Wall", "-static")
SCALAR, NEON = 0, 3  # fxp_simd_level numbers
ALL_LEVELS = range(8)  # the harness tries 0..7
FAST = settings(max_examples=25, deadline=None)


@dataclass
class Run:
    simd_level: int
    levels: list[int]
    # per case: label ("best" or a level number) -> (rc, results or None, untouched)
    cases: list[dict[str, tuple[int, list[int] | None, bool | None]]] = field(default_factory=list)


def _skip_missing(what: str) -> None:
    pytest.skip(f"{what}; install the aarch64 cross toolchain and qemu with `{INSTALL}`")


def _build(tmp: Path, *extra: str) -> Path:
    if shutil.which(CC) is None or shutil.which(QEMU) is None:
        _skip_missing(f"{CC} or {QEMU} is not on PATH")
    binary = tmp / ("xnor_check" + "".join(extra).replace("-", "_").replace("+", "_").replace("=", "_"))
    done = subprocess.run([CC, *FLAGS, *extra, str(SOURCE), str(HARNESS), "-o", str(binary)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        if "No such file" in done.stderr or "cannot find -l" in done.stderr:
            _skip_missing(f"the aarch64 C library is missing ({done.stderr.strip().splitlines()[-1]})")
        raise AssertionError(f"{CC} failed:\n{done.stderr[-4000:]}")
    return binary


@pytest.fixture(scope="module")
def neon_binary(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("aarch64"))


def _words(x: torch.Tensor) -> str:
    return " ".join(f"{v:x}" for v in np.ascontiguousarray(x.numpy()).view(np.uint64).ravel().tolist())


def run_harness(binary: Path, cases: list[tuple[torch.Tensor, torch.Tensor, int]]) -> Run:
    """Run the harness under qemu on cases (a, b, k) of int64 words; parse what it prints."""
    lines = []
    for a, b, k in cases:
        assert a.shape[1] == b.shape[1]
        lines += [f"{a.shape[0]} {b.shape[0]} {k} {a.shape[1]}", _words(a), _words(b)]
    done = subprocess.run([QEMU, str(binary)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"harness exited {done.returncode} (-11 = SIGSEGV: an out-of-bounds access)\n" \
                                 f"{done.stderr[-2000:]}"
    out = done.stdout.splitlines()
    assert out[0].startswith("simd_level ") and out[1].startswith("levels")
    run = Run(int(out[0].split()[1]), [int(v) for v in out[1].split()[1:]])
    for line in out[2:]:
        head, *rest = line.split()
        if head == "case":
            assert int(rest[0]) == len(run.cases)
            run.cases.append({})
            continue
        assert head == "gemm", line
        label, rc = rest[0], int(rest[1])
        if rc == 0:
            run.cases[-1][label] = (rc, [int(v) for v in rest[2:]], None)
        else:
            assert rest[2] == "untouched"
            run.cases[-1][label] = (rc, None, rest[3] == "1")
    assert len(run.cases) == len(cases), done.stdout[-2000:]
    return run


def check_run(run: Run, cases: list[tuple[torch.Tensor, torch.Tensor, int]], expected: list[torch.Tensor]) -> None:
    """NEON is the default, every path the build has equals the reference, the others refuse."""
    assert run.simd_level == NEON and run.levels == [SCALAR, NEON]
    for index, ((a, b, k), want) in enumerate(zip(cases, expected)):
        got = run.cases[index]
        want = want.reshape(-1).tolist()
        where = f"case {index}: m={a.shape[0]} n={b.shape[0]} w={a.shape[1]} k={k}"
        for label in ("best", str(SCALAR), str(NEON)):
            rc, values, _ = got[label]
            assert rc == 0 and values == want, f"{where}: path {label} differs from the reference"
        for level in ALL_LEVELS:
            if level not in (SCALAR, NEON):
                assert got[str(level)][0] == -1 and got[str(level)][2], f"{where}: level {level} is not in this build"


def popcount_reference(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """K - 2 popcount(a_i ^ b_j) in pure torch, bit by bit (int64 words, any bits set)."""
    x = a[:, None, :] ^ b[None, :, :]
    bits = sum((x >> s) & 1 for s in range(64))
    return (k - 2 * bits.sum(-1)).to(torch.int32)


def values(seed: int, *shape: int) -> torch.Tensor:
    """Random floats with exact zeros and negative zeros mixed in (both binarize to +1)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    pick = torch.rand(*shape, generator=generator)
    x[pick < 0.05] = 0.0
    x[(pick >= 0.05) & (pick < 0.1)] = -0.0
    return x


def random_words(generator: torch.Generator, rows: int, words: int) -> torch.Tensor:
    return torch.randint(-2**63, 2**63 - 1, (rows, words), dtype=torch.int64, generator=generator)


# Word counts around the NEON vector (2 words: odd counts leave a one-word scalar tail) and its
# byte-count block (31 vectors = 62 words; 124 = two blocks), short rows below any vector.
WORDS = (1, 2, 3, 4, 5, 7, 8, 9, 61, 62, 63, 64, 65, 123, 124, 125, 126, 127)
# Rows / columns on and off the 2x4 tile: partial tiles in m, n and both.
SHAPES = ((1, 1), (2, 4), (3, 5), (5, 3), (7, 9), (4, 8), (1, 6), (6, 1))


def test_neon_is_the_default_level_on_aarch64_and_other_levels_refuse(neon_binary):
    generator = torch.Generator().manual_seed(1)
    a, b = random_words(generator, 3, 5), random_words(generator, 2, 5)
    run = run_harness(neon_binary, [(a, b, 320)])
    check_run(run, [(a, b, 320)], [popcount_reference(a, b, 320)])


def test_neon_is_bit_exact_on_odd_word_counts_and_tile_edges(neon_binary):
    """Random words (all bits, not just packed signs), every WORDS x SHAPES case in one qemu run."""
    cases, expected = [], []
    for words in WORDS:
        for m, n in SHAPES:
            generator = torch.Generator().manual_seed(words * 1000 + m * 10 + n)
            a, b = random_words(generator, m, words), random_words(generator, n, words)
            cases.append((a, b, 64 * words))
            expected.append(popcount_reference(a, b, 64 * words))
    check_run(run_harness(neon_binary, cases), cases, expected)


@FAST
@given(shapes=st.lists(st.tuples(st.integers(1, 11), st.integers(1, 13), st.integers(1, 70 * 64)),
                       min_size=1, max_size=4),
       seed=st.integers(0, 2**31))
def test_neon_agrees_with_the_float_reference_on_packed_signs(neon_binary, shapes, seed):
    """K not a multiple of 64: the last word's unused bits are 0 in both operands."""
    cases, expected = [], []
    for index, (m, n, k) in enumerate(shapes):
        x, w = values(seed + 2 * index, m, k), values(seed + 2 * index + 1, n, k)
        cases.append((pack_weight(x), pack_weight(w), k))
        expected.append((binary_sign(x) @ binary_sign(w).T).to(torch.int32))
    check_run(run_harness(neon_binary, cases), cases, expected)


def test_neon_on_a_large_layer_with_many_tiles(neon_binary):
    x, w = values(7, 70, 300), values(8, 37, 300)
    cases = [(pack_weight(x), pack_weight(w), 300)]
    check_run(run_harness(neon_binary, cases), cases, [(binary_sign(x) @ binary_sign(w).T).to(torch.int32)])


def test_all_ones_rows_count_every_bit_and_large_word_counts_do_not_overflow(neon_binary):
    """All-different rows (popcount = K) over several NEON byte-count blocks: each byte sums 248 at most."""
    cases, expected = [], []
    for words in (2 * 31 * 3, 2 * 31 * 3 + 1, 2 * 31 * 4 + 7):
        a = torch.full((3, words), -1, dtype=torch.int64)
        b = torch.zeros(5, words, dtype=torch.int64)
        cases += [(a, b, 64 * words), (a, a, 64 * words)]
        expected += [torch.full((3, 5), -64 * words, dtype=torch.int32),
                     torch.full((3, 3), 64 * words, dtype=torch.int32)]
    check_run(run_harness(neon_binary, cases), cases, expected)


def test_aarch64_build_without_simd_falls_back_to_scalar(tmp_path):
    """-march=armv8-a+nosimd leaves __ARM_NEON undefined: level 0 only, still exact."""
    binary = _build(tmp_path, "-march=armv8-a+nosimd")
    generator = torch.Generator().manual_seed(3)
    a, b = random_words(generator, 3, 9), random_words(generator, 5, 9)
    run = run_harness(binary, [(a, b, 576)])
    assert run.simd_level == SCALAR and run.levels == [SCALAR]
    rc, got, _ = run.cases[0]["best"]
    assert rc == 0 and got == popcount_reference(a, b, 576).reshape(-1).tolist()
    assert run.cases[0][str(NEON)][0] == -1 and run.cases[0][str(NEON)][2]
