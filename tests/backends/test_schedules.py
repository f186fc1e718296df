"""The default CPU schedules: they apply to matmul-like functions and keep results exact."""
from __future__ import annotations

import re

import pytest
import torch

from fxpress import backends
from fxpress.ir import capture


class Attention(torch.nn.Module):
    """Ragged rows (13), an NT matmul (q @ k^T), a batched PV matmul, softmax and a GELU MLP."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(40, 120)
        self.mlp = torch.nn.Linear(40, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-1, -2) / 40 ** 0.5).softmax(-1)
        return torch.nn.functional.gelu(self.mlp(attn @ v))


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return capture(Attention().eval(), (torch.randn(3, 13, 40),), name="attention")


def _scheduled_functions(graph):
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.lowering import to_relax
    from fxpress.backends.tvm.pipeline import fused_module
    from fxpress.backends.tvm.schedules import cpu_rules

    target = tvm.target.Target(host_cpu_target())
    mod = fused_module(to_relax(graph).mod, target)
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    return {gv.name_hint: bool(f.attrs and "tirx.is_scheduled" in f.attrs)
            for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def test_every_function_of_main_gets_a_schedule(graph):
    scheduled = _scheduled_functions(graph)
    matmuls = [name for name in scheduled if "matmul" in name]
    assert matmuls and all(scheduled[name] for name in matmuls)
    assert all(scheduled.values()), [name for name, done in scheduled.items() if not done]


@pytest.mark.parametrize("schedule", [True, False])
def test_scheduled_and_naive_match_eager(graph, schedule):
    compiled = backends.compile(graph, "llvm", schedule=schedule)
    expected = graph.module(*graph.example_inputs)
    assert (compiled(*graph.example_inputs) - expected).abs().max().item() < 1e-5


def test_conv_as_matmul_with_tiles_across_images_matches_eager():
    """Regression: a 4-row tile over n*h*w rows (392 = 8 images x 49) once read uncomputed rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 4, stride=4), torch.nn.ReLU()).eval()
    x = torch.randn(8, 1, 28, 28)
    compiled = backends.compile(capture(model, (x,), name="patches"), "llvm")
    assert (compiled(x) - model(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("rows,cols,lanes", [(400, 192, 16), (50, 50, 16), (28, 1536, 16), (14, 14, 16),
                                             (7, 3, 16), (64, 64, 8), (13, 40, 4)])
def test_register_tile_fits_the_registers_and_fills_whole_vectors(rows, cols, lanes):
    from fxpress.backends.tvm.schedules import register_tile

    row_tile, col_tile = register_tile(rows, cols, lanes)
    vectors = col_tile // lanes
    registers = 32 if lanes >= 16 else 16
    assert col_tile % lanes == 0 and 1 <= row_tile <= 12
    assert row_tile * vectors + vectors + 1 <= registers - (2 if registers > 16 else 1)


def test_register_tile_on_avx2_is_not_load_bound():
    """16 registers (AVX2): 6 rows x 2 vectors (15 registers; 8 loads per 12 FMAs), not the 10 x 1 tile
    (11 loads per 10 FMAs) a 14-register budget left, which ran MiniLM's linears 1.4x slower."""
    from fxpress.backends.tvm.schedules import register_tile

    assert register_tile(28, 1536, 8) == (6, 16)
    assert register_tile(800, 192, 8) == (6, 16)  # ties with 12 x 1 on step cycles: fewer loads win
    # 12 x 1 pads 197 x 197 attention scores least but ran 1.5x slower (13 loads per 12 FMAs)
    assert register_tile(197, 197, 8) == register_tile(50, 50, 8) == (6, 16)
    assert register_tile(8, 8, 8) == (8, 8)  # 6 x 2 would double the work of 8 columns


def test_vector_bits_follow_the_isa_not_llvms_guess():
    """LLVM reports 512-bit vectors for an AVX2-only znver3; the schedules size tiles for 256."""
    import tvm

    from fxpress.backends.tvm.schedule_utils import vector_bits

    assert vector_bits(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})) == 256
    assert vector_bits(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) == 256
    assert vector_bits(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == 512
    assert vector_bits(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})) == 128


def _matmul_script(a_shape, b_shape):
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.schedules import cpu_rules

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(b_shape, "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(a, b)))
        bb.emit_func_output(out)
    target = tvm.target.Target(host_cpu_target())
    with target:
        mod = relax.transform.LegalizeOps()(bb.get())
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    return next(f for gv, f in mod.functions_items() if gv.name_hint == "matmul").script()


@pytest.mark.parametrize("a_shape,b_shape", [((32, 50, 16), (32, 16, 50)), ((24, 14, 32), (24, 32, 14)),
                                             ((400, 64), (64, 192))])
def test_ragged_matmuls_are_padded_and_their_update_is_vectorized(a_shape, b_shape):
    script = _matmul_script(a_shape, b_shape)
    update = script[script.index("for ax3"):script.index('T.sblock("matmul_update")')]
    assert "T.vectorized" in update, update
    import tvm

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.schedule_utils import vector_bits
    from fxpress.backends.tvm.schedules import register_tile

    rows, cols = a_shape[-2], b_shape[-1]
    row_tile, col_tile = register_tile(rows, cols, vector_bits(tvm.target.Target(host_cpu_target())) // 32)
    padded = (rows % row_tile != 0) + (cols % col_tile != 0)  # A's rows, B's columns
    assert ("_pad" in script) == bool(padded)
    # a padded tile is copied to C from registers, per tile: no padded C and no strip pass after it
    assert script.count("T.parallel(") == 1 + padded, script


def test_ragged_attention_with_a_dynamic_batch_matches_eager(graph):
    dynamic = capture(Attention().eval(), (torch.randn(3, 13, 40),), dynamic=True, name="attention-dyn")
    compiled = backends.compile(dynamic, "llvm", dynamic=True)
    for batch in (1, 5):
        x = torch.randn(batch, 13, 40)
        assert (compiled(x) - dynamic.module(x)).abs().max().item() < 1e-5


def test_row_reduction_declines_what_dlight_refuses_instead_of_failing_the_compile(monkeypatch):
    """dlight's cpu.Reduction raises on some functions (chained reductions: "... is an output block")."""
    import tvm
    from tvm import te
    from tvm.s_tir.dlight.cpu import Reduction

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.reduction_schedule import RowReduction

    def refuse(*_args):
        raise tvm.error.InternalError("The block inner is an output block")

    monkeypatch.setattr(Reduction, "apply", refuse)
    x = te.placeholder((4, 16), name="x")
    k = te.reduce_axis((0, 16), name="k")
    total = te.compute((4,), lambda i: te.sum(x[i, k], axis=k), name="total")
    target = tvm.target.Target(host_cpu_target())
    with target:
        assert RowReduction().apply(te.create_prim_func([x, total]), target, False) is None


def test_a_symbolic_batch_of_50_token_rows_gets_a_row_tile_that_divides_50():
    from tvm import tirx

    from fxpress.backends.tvm.schedules import register_tile

    batch = tirx.Var("batch", "int64")
    rows, cols = register_tile(batch * 50, 192, 16, row_multiple=50)
    assert 50 % rows == 0 and rows >= 4 and cols % 16 == 0
    script = _matmul_script((batch, 50, 64), (64, 192))
    update = script[script.index("for ax3"):script.index("matmul_update")]
    body = script[script.index('T.sblock("matmul_update")'):]
    body = body[:body.index("T.sblock(", 10)]
    assert "T.vectorized" in update, update
    row_var = re.search(r"for (\w+) in T.unroll", update).group(1)
    predicates = re.findall(r"T.where\((.*)\)", body)
    # no partial row tile; a partial block of row tiles is skipped by a predicate on the tile alone
    assert not any(row_var in predicate for predicate in predicates), predicates


class SlicedEpilogues(torch.nn.Module):
    """Epilogues the matmul rule folds into its write-back (bias + GELU) and ones it must not (a slice
    of C, a padded 50-wide matmul): folding those would write past the output."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 192)

    def forward(self, x):
        y = torch.nn.functional.gelu(self.fc(x))
        scores = x[..., :16] @ x[..., 16:32].transpose(-1, -2)
        return y[..., :64] * 2.0, y, scores + 1.0


def test_epilogues_folded_into_the_tile_write_back_match_eager():
    torch.manual_seed(0)
    model, x = SlicedEpilogues().eval(), torch.randn(4, 50, 64)
    compiled = backends.compile(capture(model, (x,), name="epilogues"), "llvm")
    for got, expected in zip(compiled(x), model(x)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class TokenMLP(torch.nn.Module):
    """Linears over (batch, tokens, features): a ViT block's MLP."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(40, 24)
        self.fc2 = torch.nn.Linear(24, 40)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _fused_relax(graph, dynamic: bool) -> str:
    import tvm

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.lowering import to_relax
    from fxpress.backends.tvm.pipeline import fused_module

    mod = fused_module(to_relax(graph, dynamic=dynamic).mod, tvm.target.Target(host_cpu_target()))
    return mod.script()


@pytest.mark.parametrize("tokens", [47, 13])
def test_a_dynamic_batch_of_ragged_token_rows_runs_padded_rows_and_matches_eager(tokens):
    """47 tokens (ToMe-merged 50): no row tile divides a symbolic batch x 47 rows, so the linears run
    (batch, 48, K) and slice the result (schedules.PadMatmuls)."""
    torch.manual_seed(0)
    model = TokenMLP().eval()
    graph = capture(model, (torch.randn(2, tokens, 40),), dynamic=True, name="token-mlp")
    padded = -(-tokens // 6) * 6
    script = _fused_relax(graph, dynamic=True)
    assert "pad" in script and "strided_slice" in script
    assert f"T.int64({padded}), T.int64(40)" in script and f"T.int64({padded}), T.int64(24)" in script, script
    compiled = backends.compile(graph, "llvm", dynamic=True)
    for batch in (1, 3, 8):
        x = torch.randn(batch, tokens, 40)
        assert compiled(x).shape == (batch, tokens, 40)
        assert (compiled(x) - model(x)).abs().max().item() < 1e-5


class HeadsProjection(torch.nn.Module):
    """Attention's output projection: heads (batch, heads, tokens, head dim) back to rows, then a linear."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 40)

    def forward(self, heads):
        batch, count, tokens, dim = heads.shape
        return self.proj(heads.permute(0, 2, 1, 3).reshape(batch, tokens, count * dim))


def test_a_dynamic_batch_of_attention_heads_runs_its_projection_on_padded_rows():
    """The heads' two reshapes merge into one from (n, T, heads, head dim), which the row padding did not
    recognize: the w192 197-token ViT's projections ran on ragged predicated tiles in the dynamic build,
    526 ms of 3288 at batch 64 against 149 ms static; padded, 170 ms of 2611."""
    torch.manual_seed(0)
    model = HeadsProjection().eval()
    graph = capture(model, (torch.randn(2, 4, 47, 8),), dynamic=True, name="heads-proj")
    script = _fused_relax(graph, dynamic=True)
    assert "T.int64(48), T.int64(32)" in script and "strided_slice" in script, script
    compiled = backends.compile(graph, "llvm", dynamic=True)
    for batch in (1, 3):
        x = torch.randn(batch, 4, 47, 8)
        assert (compiled(x) - model(x)).abs().max().item() < 1e-5


def test_a_dynamic_batch_of_linears_fuses_each_bias_and_activation_into_its_matmul():
    """A decomposed linear over a symbolic batch is reshape, matmul, bias add, reshape back.  The bias
    moves before the flattening reshape and the slice of padded rows, so each linear is one kernel
    with its bias, GELU and residual add (it was 12 kernels: opaque reshapes fused nothing)."""
    graph = capture(TokenMLP().eval(), (torch.randn(2, 47, 40),), dynamic=True, name="token-mlp")
    script = _fused_relax(graph, dynamic=True)
    main = script[script.index("def main("):]
    calls = re.findall(r"R\.call_tir\(cls\.(\w+)", main)
    assert len(calls) == 3 and calls[0] == "pad", calls
    assert re.fullmatch(r"fused_matmul_add_strided_slice_fast_gelu_pad\d*", calls[1]), calls
    assert re.fullmatch(r"fused_matmul\d+_add\d+_strided_slice\d+_add\d+", calls[2]), calls


def test_a_reshape_to_symbolic_dims_is_injective_so_it_fuses():
    """TVM's legalization of reshape((n * 54, 576) -> (n, 54, 576)) reads ``x[(i * 54 + j) % (n * 54), k]``,
    which AnnotateTIROpPattern calls opaque (8); fxpress's gather reads ``x[i * 54 + j, k]``: injective (2).
    So does its reshape to a product of dims ((n, 54, 576) -> (n * 54, 576)), which TVM's left opaque
    too: a dynamic ViT's attention ran each as a VM reshape between two kernels, and the pad after it
    as a kernel of its own."""
    import tvm
    from tvm import relax, tirx

    from fxpress.backends.tvm.pipeline import _reshape_affine

    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 54, 576), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, (n * 54, 576)))
            y = bb.emit_output(bb.emit(relax.op.reshape(flat, (n, 54, 576))))
        bb.emit_func_output(y)
    patterns = {}
    for name, rules in (("tvm", {}), ("fxpress", {"relax.reshape": _reshape_affine})):
        mod = relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps(rules)(bb.get()))
        patterns[name] = sorted(int(f.attrs["op_pattern"]) for _, f in mod.functions_items()
                                if isinstance(f, tirx.PrimFunc))
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        data = torch.randn(3, 54, 576)
        torch.testing.assert_close(torch.from_dlpack(vm["main"](tvm.runtime.tensor(data.numpy()))), data,
                                   rtol=0, atol=0)
    assert patterns == {"tvm": [8, 8], "fxpress": [2, 2]}


def test_token_rows_pad_only_where_the_tiles_dividing_them_cost_more():
    """AVX-512 (16 lanes, 30 registers): 50 rows take a 10 x 2 tile and 44 an 11 x 2, so they stay
    unpadded (a 54- or 48-row matmul plus the pad and slice copies cost more); 47, 41 and 197 have no
    dividing tile of 4 rows or more and pad.  AVX2 (8 lanes, 15 registers) has no 10- or 11-row tile
    and pads 44 and 50; 20 rows cost the same as 24 there, so they are left unpadded."""
    from fxpress.backends.tvm.schedules import pads_rows

    assert [t for t in (50, 47, 44, 41, 32, 197, 20, 48) if pads_rows(t, 768, 16)] == [47, 41, 197]
    assert [t for t in (50, 47, 44, 41, 32, 197, 20, 48) if pads_rows(t, 768, 8)] == [50, 47, 44, 41, 32, 197]
    assert not pads_rows(48, 768, 8)  # a multiple of 6 never pads


@pytest.mark.parametrize("tokens,dynamic", [(47, False), (48, True)])
def test_static_rows_and_whole_tiles_of_token_rows_are_not_padded(tokens, dynamic):
    graph = capture(TokenMLP().eval(), (torch.randn(2, tokens, 40),), dynamic=dynamic, name="token-mlp")
    script = _fused_relax(graph, dynamic=dynamic)
    assert "pad" not in script and "strided_slice" not in script, script


def test_a_larger_than_l2_runs_in_row_blocks_padded_least_and_matches_eager():
    from tvm import tirx

    from fxpress.backends.tvm.schedules import A_BLOCK_BYTES, _row_block

    assert _row_block(60, 64, 6) is None  # 60 x 64 floats fit
    block = _row_block(12606, 384, 6)  # 2,101 row tiles of 384 (a ViT-S at batch 64): 11 x 191, no padding
    assert block == 11 and block * 6 * 384 * 4 <= A_BLOCK_BYTES
    # 12,608 rows = 2,102 tiles = 2 x 1051: a block that divides would be 2 tiles (12 rows); a block
    # near the budget pads a few tiles instead
    block = _row_block(12608, 192, 6)
    assert A_BLOCK_BYTES // 2 <= block * 6 * 192 * 4 <= A_BLOCK_BYTES and -(-2102 // block) * block - 2102 < 10
    # the same rows in AVX-512's tiles of 8 are whole (1,576 = 8 x 197 tiles): no block of 16-32 divides
    # them, so the last block of 32 is partial (skipped tiles, no padded rows), rather than no block at all
    assert _row_block(12608, 192, 8) == 32 and _row_block(8 * 197, 192, 8) == 32
    batch = tirx.Var("n", "int64")
    assert _row_block(batch * 8, 384, 6, row_multiple=8) is None  # symbolic rows the tile does not divide
    # a dynamic batch of 198-token rows: 33 tiles of 6 per image, 24-32 tiles of 6 x 256 floats fit, none
    # divides 33: a partial last block
    assert _row_block(batch * 198, 256, 6, row_multiple=198) == 32
    # merged 184-token rows in tiles of 8: 23 tiles per image (a prime) had no block, and a width-384 ViT's
    # feed-forward matmul at batch 64 streamed A again for each column panel (27 GMAC/s; static 42)
    assert _row_block(batch * 184, 384, 8, row_multiple=184) == 16
    assert _row_block(batch * 192, 384, 8, row_multiple=192) == 12  # 24 tiles: a block that divides
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 96).eval()
    x = torch.randn(2, 1000, 256)  # 2000 rows of A: 2 MB
    graph = capture(model, (x,), name="big-a")
    compiled = backends.compile(graph, "llvm")
    assert (compiled(x) - model(x)).abs().max().item() < 1e-4
    x = torch.randn(64, 197, 256)  # 12,608 rows: whole row tiles on AVX-512, padded ones on AVX2
    compiled = backends.compile(capture(model, (x,), name="vit-batch"), "llvm")
    assert (compiled(x) - model(x)).abs().max().item() < 1e-4
    x = torch.randn(2, 198, 256)
    graph = capture(model, (x,), name="big-a-dynamic", dynamic={0: {0: "batch"}})
    compiled = backends.compile(graph, "llvm", dynamic=True)
    for images in (1, 3, 32):  # 33 and 99 tiles (a partial last block of 32), 1,056 (whole blocks)
        x = torch.randn(images, 198, 256)
        assert (compiled(x) - model(x)).abs().max().item() < 1e-4


class PrimeSoftmax(torch.nn.Module):
    """Softmax over rows of 37 (a prime): no vector width divides the row."""

    def forward(self, x):
        return (x * 0.5).softmax(-1)


def test_softmax_over_a_prime_row_runs_whole_vectors_and_a_scalar_tail():
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.lowering import to_relax
    from fxpress.backends.tvm.pipeline import fused_module
    from fxpress.backends.tvm.schedules import cpu_rules

    x = torch.randn(4, 6, 37, generator=torch.Generator().manual_seed(0)) * 4
    graph = capture(PrimeSoftmax().eval(), (x,), name="prime_softmax")
    target = tvm.target.Target(host_cpu_target())
    mod = fused_module(to_relax(graph).mod, target)
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    [script] = [f.script() for gv, f in mod.functions_items()
                if isinstance(f, tirx.PrimFunc) and "softmax" in gv.name_hint]
    exp = script[script.index('T.sblock("T_softmax_exp'):]
    assert "_partition" in script and "T.vectorized" in script[:script.index("T_softmax_exp")] + exp[:2000], script
    compiled = backends.compile(graph, "llvm")
    assert torch.allclose(compiled(x), graph.module(x), atol=1e-6, rtol=1e-5)



def test_layer_norm_over_two_row_dims_sums_whole_vectors_of_partials():
    """(batch, tokens, 192) rows: each row's sum splits into 16 partial sums, which run as vectors with
    the 12 steps along the row outside.  The rule once vectorized a unit loop of the second row dim
    instead (scalar sums: 0.72 ms against eager's 0.31 at 64 x 50 x 192, 0.20 ms after)."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.lowering import to_relax
    from fxpress.backends.tvm.pipeline import fused_module
    from fxpress.backends.tvm.schedules import cpu_rules

    model, x = torch.nn.LayerNorm(192).eval(), torch.randn(4, 50, 192)
    graph = capture(model, (x,), name="layer_norm")
    target = tvm.target.Target(host_cpu_target())
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(fused_module(to_relax(graph).mod, target))
    [script] = [f.script() for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    blocks = re.findall(r'T\.sblock\("(\w+_sum_rf)"\)', script)
    assert len(blocks) == 2, script  # the sum and the sum of squares
    for block in blocks:
        nest = script[:script.index(f'T.sblock("{block}")')].rsplit("T.parallel", 1)[1]
        loops = re.findall(r"for .* in (.*):\n", nest)[-2:]  # the two loops right around the block
        assert loops == ["T.grid(T.int64(12), T.int64(1), T.int64(1))", "T.vectorized(T.int64(16))"], nest
    compiled = backends.compile(graph, "llvm")
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)

def test_attention_matmuls_take_operands_padded_to_whole_tiles_before_fusion(graph):
    """13 tokens: q @ k^T and p @ v get whole register tiles from pads fused into their producers
    (schedules.PadMatmuls), not padding copies and a predicated strip inside the matmul."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.lowering import to_relax
    from fxpress.backends.tvm.pipeline import fused_module
    from fxpress.backends.tvm.schedules import cpu_rules

    target = tvm.target.Target(host_cpu_target())
    mod = fused_module(to_relax(graph).mod, target)
    main = mod["main"].script()
    assert main.count("_pad") >= 3, main  # q and k^T for the scores, the probabilities for p @ v
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
    batched = [f.script() for gv, f in mod.functions_items()  # the linears fuse their bias add
               if isinstance(f, tirx.PrimFunc) and "matmul" in gv.name_hint and "add" not in gv.name_hint]
    assert len(batched) == 2
    assert all("_pad = T.sblock_alloc_buffer" not in script for script in batched), batched[0]


class PrimeAttention(torch.nn.Module):
    """Scaled dot-product attention over a prime token count, scale on the scores as timm's ViT has it."""

    def __init__(self, width: int = 64, heads: int = 2, column_bias: bool = False):
        super().__init__()
        self.qkv, self.heads, self.column_bias = torch.nn.Linear(width, 3 * width), heads, column_bias

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (width // self.heads) ** -0.5
        if self.column_bias:  # a bias per key, as ToMe adds log(size): (batch, 1, 1, tokens)
            scores = scores + (x.abs().sum(-1) + 1).log()[:, None, None, :]
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, width)


@pytest.mark.parametrize("dynamic,column_bias,tokens", [(False, False, 37), (True, False, 37), (False, True, 37),
                                                        (True, True, 37), (False, True, 46)])
def test_softmax_over_a_prime_token_count_runs_on_the_padded_scores(dynamic, column_bias, tokens):
    """37 tokens: the scores are computed padded to whole tiles; their softmax ran over the 37 valid
    columns as one scalar chain per reduction (no divisor splits a prime row; a 197-token ViT's softmax
    at batch 64 took 163 ms against eager's 78).  It now runs over the padded columns masked to -inf, in
    vector partial sums, and p @ v reads the padded probabilities against zero-padded values: 62 ms.
    A bias per key column added to the scores (ToMe's log(size)) is padded with them.  46 columns split
    into 23 partials of 2, not whole vectors, so they take the padded scores too (a merged ViT's
    softmax over 184 columns: 60 ms at batch 64 against eager's 35-40, 26 ms padded)."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.lowering import to_relax
    from fxpress.backends.tvm.pipeline import fused_module
    from fxpress.backends.tvm.schedule_utils import vector_bits
    from fxpress.backends.tvm.schedules import cpu_rules

    torch.manual_seed(0)
    model = PrimeAttention(column_bias=column_bias).eval()
    graph = capture(model, (torch.randn(2, tokens, 64),), dynamic=dynamic, name="prime-attention")
    target = tvm.target.Target(host_cpu_target())
    with target:
        mod = dl.ApplyDefaultSchedule(*cpu_rules())(fused_module(to_relax(graph, dynamic=dynamic).mod, target))
    softmax = [f.script() for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and "softmax" in gv.name_hint]
    assert len(softmax) == 1 and "T_softmax_maxelem_rf" in softmax[0], softmax  # split into vector partials
    assert f"T.int64({tokens}))" not in softmax[0].split("def ")[1].split("):")[0]  # over the padded columns
    main = mod["main"].script()
    assert "where" in main, main
    compiled = backends.compile(graph, "llvm", dynamic=dynamic)
    for batch in ((2,) if not dynamic else (1, 3)):
        x = torch.randn(batch, tokens, 64)
        assert (compiled(x) - model(x)).abs().max().item() < 1e-5
    assert vector_bits(target) // 32 < 37


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_kernels_keep_per_buffer_alias_information(dynamic):
    """Every kernel's loads and stores carry their buffer's TBAA tag, none the shared ``tvm-alias`` one.

    A register tile lives in memory LLVM must tell from the operands (a stack array, or from 1,024
    bytes a workspace allocation where ``stack_tiles`` does not apply); it stays in registers only then.  A kernel whose buffers codegen
    marks as possibly aliasing (``tvm-alias``) stored its accumulators after every FMA and reloaded the
    broadcast row (2x slower).  TVM 0.27 marked every kernel so when the dynamic build's ``shape_func``
    sorted last (:func:`~fxpress.backends.tvm.pipeline.single_pointer_functions_noalias`).
    """
    torch.manual_seed(0)
    model, x = TokenMLP().eval(), torch.randn(2, 50, 40)
    graph = capture(model, (x,), dynamic=dynamic, name="token-mlp")
    compiled = backends.compile(graph, "llvm", dynamic=dynamic)
    code = "".join(m.inspect_source("ll") for m in compiled.executable.library.mod.imports)
    assert "fmuladd" in code and '"tvm-tbaa"' in code
    assert '"tvm-alias"' not in code
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_functions_with_one_pointer_are_marked_noalias_and_mixed_ones_are_named(caplog):
    """TVM 0.27's LLVM codegen emits every function of a module with the ``tirx.noalias`` of the one it
    declared last; the VM's ``shape_func`` has none.  One pointer aliases nothing, so it gets the mark;
    a function of two pointers without it is left alone and named in a warning."""
    import tvm
    from tvm.script import tirx as T

    from fxpress.backends.tvm.pipeline import mixed_alias_functions, single_pointer_functions_noalias

    @T.prim_func
    def kernel(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in range(4):
            b[i] = a[i]

    @T.prim_func
    def shape_func(heap: T.Buffer((4,), "int64"), n: T.int64):
        heap[0] = n

    @T.prim_func
    def two_pointers(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i]

    mod = tvm.IRModule({"kernel": kernel, "shape_func": shape_func})
    assert mixed_alias_functions(mod) == ["shape_func"]
    marked = single_pointer_functions_noalias(mod)
    assert all(bool(func.attrs["tirx.noalias"]) for _, func in marked.functions_items())
    assert mixed_alias_functions(marked) == []
    assert "tirx.noalias" not in (mod["shape_func"].attrs or {})  # the input module is not changed
    with caplog.at_level("WARNING", logger="fxpress.backends.tvm.pipeline"):
        kept = single_pointer_functions_noalias(tvm.IRModule({"kernel": kernel, "two_pointers": two_pointers}))
    assert "tirx.noalias" not in (kept["two_pointers"].attrs or {})
    assert "two_pointers" in caplog.text


def test_a_dynamic_function_builds_each_symbolic_shape_once():
    """VMShapeLower builds a symbolic shape from the shape heap at every use: a ViT over a dynamic batch
    made 456 ``make_shape`` calls per run for 235 distinct shapes.  After ``reuse_shape_values`` each
    distinct one is built once, and the function still computes the same thing.  Nothing else moves:
    with CanonicalizeBindings it also read a tuple's tensor where the tuple was read, after the tensor's
    kill (a crash)."""
    import tvm
    from tvm import relax, tirx

    from fxpress.backends.tvm.pipeline import _lower_and_finalize, reuse_shape_values

    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(x, x))
            b = bb.emit(relax.op.multiply(a, x))
            c = bb.emit(relax.op.flatten(relax.op.add(b, a)))
            y = bb.emit_output(relax.op.subtract(c, relax.op.flatten(x)))
            both = bb.emit_output(relax.Tuple([y, c]))
        bb.emit_func_output(both)  # the VM checks the shape of each output after the tuple is made
    legalized = relax.transform.LegalizeOps()(bb.get())
    pipelines = {"all": _lower_and_finalize(), "without": [p for p in _lower_and_finalize() if p is not reuse_shape_values]}
    calls, outputs = {}, {}
    data = torch.randn(3, 4)
    for name, passes in pipelines.items():
        lowered = tvm.transform.Sequential(passes)(legalized)
        calls[name] = re.findall(r'"vm\.builtin\.make_shape", shape_heap, ([\d, ]+), ty_args', lowered["main"].script())
        vm = relax.VirtualMachine(tvm.compile(legalized, "llvm", relax_pipeline=tvm.transform.Sequential(passes)), tvm.cpu())
        outputs[name] = torch.from_dlpack(vm["main"](tvm.runtime.tensor(data.numpy()))[0])
    assert len(calls["without"]) > len(set(calls["without"])) > 1, calls  # (n, 4), (n * 4,), storage sizes
    assert sorted(calls["all"]) == sorted(set(calls["without"])), calls
    twice = data + data
    torch.testing.assert_close(outputs["all"], (twice * data + twice - data).flatten(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outputs["all"], outputs["without"], rtol=0, atol=0)


def _tile_kernel(floats: int):
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def kernel(a: T.Buffer((4, floats), "float32"), b: T.Buffer((4, floats), "float32")):
        T.func_attr({"tirx.noalias": True, "global_symbol": "kernel"})
        for i in range(4):
            with T.sblock("row"):
                vi = T.axis.spatial(4, i)
                tile = T.sblock_alloc_buffer((floats,), "float32")
                for j in range(floats):
                    with T.sblock("load"):
                        vj = T.axis.spatial(floats, j)
                        tile[vj] = a[vi, vj] * T.float32(2)
                for j in range(floats):
                    with T.sblock("store"):
                        vj = T.axis.spatial(floats, j)
                        b[vi, vj] = tile[floats - 1 - vj] + T.float32(1)

    return kernel


@pytest.mark.parametrize("floats, default, ours", [(64, "stack", "stack"), (256, "pool", "stack"),
                                                   (1024, "pool", "stack"), (8192, "pool", "pool")])
def test_tile_buffers_up_to_16_kb_stay_on_the_stack(floats, default, ours):
    """TVM allocates a constant-size buffer of 1,024 bytes or more from its workspace pool, once per tile:
    16 AVX-512 accumulators are exactly that much.  The "fxpress" TIR pipeline keeps such buffers up to
    16 KB on the stack (:func:`~fxpress.backends.tvm.pipeline.stack_tiles`); larger ones still come
    from the pool.  The kernel computes the same either way."""
    import numpy as np
    import tvm

    from fxpress.backends.tvm.pipeline import STACK_BYTES

    assert STACK_BYTES == 16 << 10
    data = np.random.default_rng(0).random((4, floats), dtype=np.float32)
    for pipeline, expected in (("default", default), ("fxpress", ours)):
        library = tvm.compile(tvm.IRModule({"kernel": _tile_kernel(floats)}), "llvm", tir_pipeline=pipeline)
        code = library.mod.inspect_source("asm")
        assert ("pool" if "TVMBackendAllocWorkspace" in code else "stack") == expected, (floats, pipeline)
        out = tvm.runtime.tensor(np.zeros_like(data))
        library["kernel"](tvm.runtime.tensor(data), out)
        np.testing.assert_array_equal(out.numpy(), data[:, ::-1] * 2 + 1)
