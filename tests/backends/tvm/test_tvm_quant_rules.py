"""fxpress::quantized_linear / quantized_embedding compile for llvm and match the eager reference.

Every stored form (float offsets, integer zero points, symmetric, codebooks), every bit width, odd
shapes (N not a multiple of the panel, K padded to the group), one row (the codes' GEMV) and several
rows (float W at load time), with and without a bias, and packed embeddings.  The reference
dequantizes W and calls F.linear, so the two differ only by float summation order (rtol 1e-5 of
the largest output).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress import backends
from fxpress.errors import LoweringError
from fxpress.ops.quant import QUANTIZED_EMBEDDING, QUANTIZED_LINEAR, quantize_weight
from fxpress.passes import PassContext, PassManager


class Mlp(nn.Module):
    """embedding -> linear (odd N) -> relu -> linear without bias (K padded with pad=true) -> head."""

    def __init__(self, vocab: int = 37, dim: int = 64, hidden: int = 72, odd: int = 50):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.odd = nn.Linear(hidden, odd, bias=False)
        self.head = nn.Linear(odd, 11)

    def forward(self, ids):
        return self.head(torch.relu(self.odd(torch.relu(self.up(self.embed(ids))))))


def _max_error(graph, ids) -> tuple[float, float]:
    compiled = backends.compile(graph, "llvm")
    with torch.no_grad():
        expected = graph.module(ids)
    got = compiled(ids)
    got = got[0] if isinstance(got, (tuple, list)) else got
    return float((got - expected).abs().max()), float(expected.abs().max())


@pytest.mark.parametrize("options", [
    "bits=4,group=32",                        # float offsets (GGUF Q4_1's form)
    "bits=4,group=16,zero=int",               # integer zero points
    "bits=3,group=8,scheme=sym",              # 3-bit codes cross bytes; symmetric
    "bits=2,group=8,zero=int",
    "bits=2,group=6,zero=int",                # a group ending inside a byte: one code per byte in the GEMV
    "bits=8,group=24,scheme=sym",             # 72 = 3 groups of 24
])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_linears_match_eager(options, rows):
    ids = torch.randint(0, 37, (1, rows))
    graph = fxpress.capture(Mlp(), (ids,))
    quantized = PassManager(f"quantize{{{options},head=true,embed=true,pad=true}}").run(graph, PassContext()).graph
    targets = {n.target for n in quantized.fx.nodes if n.op == "call_function"}
    assert {QUANTIZED_LINEAR, QUANTIZED_EMBEDDING} <= targets
    error, scale = _max_error(quantized, ids)
    assert error <= 1e-5 * max(scale, 1.0), (options, rows, error)


class Codebook(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        packed = quantize_weight(weight, 2, 16, "asym", "int")
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("codebook", torch.tensor([-0.3, 0.9, 2.2, 3.1]))
        self.register_buffer("bias", bias)

    def forward(self, x):
        return torch.ops.fxpress.quantized_linear(x, self.codes, self.scales, self.zeros, self.codebook, self.bias,
                                                  2, 16)


@pytest.mark.parametrize("rows", [1, 3])
def test_codebook_linear_matches_eager(rows):
    torch.manual_seed(1)
    module = Codebook(torch.randn(40, 48), torch.randn(40))
    x = torch.randn(rows, 48)
    graph = fxpress.capture(module, (x,))
    error, scale = _max_error(graph, x)
    assert error <= 1e-5 * max(scale, 1.0)


def test_one_row_runs_the_codes_gemv(tmp_path):
    """The decode-shaped linear is the scheduled GEMV on repacked codes, not a float matmul."""
    ids = torch.randint(0, 37, (1, 1))
    graph = fxpress.capture(Mlp(), (ids,))
    quantized = PassManager("quantize{bits=4,group=8,zero=int}").run(graph, PassContext()).graph
    backends.compile(quantized, "llvm", dump_ir=tmp_path)
    lowered = (tmp_path / "00_lowered.relax.py").read_text()
    assert lowered.count("fxpress_quant_gemv") >= 2  # up and odd (the head stays float)
    assert "fxpress_quant_dequantize" not in lowered
    # the planes are buffers of the graph: they reach Relax as params, not constants bound into main, so
    # their repacking runs once at load (main_transform_params), never per call
    fused = (tmp_path / "01_fused.tir.py").read_text()
    transform = fused[fused.index("def main_transform_params("):]
    transform = transform[:transform.index("@R.function")] if "@R.function" in transform else transform
    main = fused[fused.index("def main("):]
    main = main[:main.index("@R.function")] if "@R.function" in main else main
    assert transform.count("fxpress_quant_codes") == 2 and transform.count("fxpress_quant_affine") == 2
    assert "fxpress_quant_codes" not in main and "fxpress_quant_affine" not in main
    assert "GenericConst" not in main


def test_half_precision_activations_are_refused():
    torch.manual_seed(2)
    packed = quantize_weight(torch.randn(16, 32), 4, 32, "asym", "int")

    class Half(nn.Module):
        def forward(self, x):
            return torch.ops.fxpress.quantized_linear(x.half(), packed.codes, packed.scales, packed.zeros, None, None,
                                                      4, 32).float()

    graph = fxpress.capture(Half(), (torch.randn(1, 32),))
    with pytest.raises(LoweringError, match="float32 activations"):
        backends.compile(graph, "llvm")
