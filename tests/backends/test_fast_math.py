"""Vectorizable exp/erf/tanh (fast_math) and the split-accumulator row reductions on llvm.

Accuracy: fast exp has 1.2e-7 relative error, erf/tanh 4.2e-7 absolute; the model
tests allow 2e-6 absolute (outputs are O(1)) and the parity tests in
test_backends_compile.py keep their 1e-4 / 1e-3 tolerances on the zoo models.
"""
from __future__ import annotations

import re

import pytest
import torch

from fxpress import backends
from fxpress.backends.tvm.fast_math import legalize_map
from fxpress.backends.tvm.reduction_schedule import accumulator_count
from fxpress.ir import capture

LIBM_CALLS = ("expf", "erff", "tanhf")


class Transcendentals(torch.nn.Module):
    """Every op fast_math rewrites, on inputs from -100 to 100 (overflow, underflow, 0)."""

    def forward(self, x):
        small = x / 10
        return torch.stack([
            torch.exp(small).clamp(max=1e30), torch.erf(x), torch.tanh(x), torch.sigmoid(x),
            torch.nn.functional.silu(small), torch.nn.functional.gelu(small),
            torch.nn.functional.gelu(small, approximate="tanh"), torch.softmax(x, -1),
        ])


class Norms(torch.nn.Module):
    """Softmax over 50 (no power-of-two divisor), layer norm over 384 and 64."""

    def __init__(self):
        super().__init__()
        self.wide = torch.nn.LayerNorm(384)
        self.narrow = torch.nn.LayerNorm(64)

    def forward(self, scores, hidden, small):
        return scores.softmax(-1), self.wide(hidden), self.narrow(small)


@pytest.fixture(scope="module")
def transcendentals():
    x = torch.linspace(-100, 100, 4 * 1000).reshape(4, 1000)
    model = Transcendentals().eval()
    return model, x, backends.compile(capture(model, (x,), name="transcendentals"), "llvm")


def test_fast_math_matches_eager(transcendentals):
    model, x, compiled = transcendentals
    expected = model(x)
    got = compiled(x)
    assert torch.isfinite(got).all()
    relative = (got - expected).abs() / expected.abs().clamp(min=1.0)
    assert relative.max().item() < 2e-6, relative.amax(dim=(1, 2))


def test_no_scalar_libm_calls_left(transcendentals):
    _, _, compiled = transcendentals
    code = "".join(m.inspect_source("asm") for m in compiled.executable.library.mod.imports)
    called = set(re.findall(r"call\w*\s+(\w+)", code))
    assert not called & set(LIBM_CALLS), called


class _Exp(torch.nn.Module):
    def forward(self, x):
        return torch.exp(x)


def test_exp_limits_are_zero_and_inf():
    """Masked attention scores (-inf, -1e4) give exactly 0; overflow gives inf as in torch."""
    x = torch.tensor([[-1e4, float("-inf"), 0.0, 88.0, 1e4, float("inf")]])
    got = backends.compile(capture(_Exp(), (x,), name="exp"), "llvm")(x)
    assert got[0, 0] == 0 and got[0, 1] == 0 and got[0, 2] == 1
    assert torch.isclose(got[0, 3], torch.exp(x[0, 3]), rtol=1e-6)
    assert torch.isinf(got[0, 4]) and torch.isinf(got[0, 5])


def test_only_float32_is_rewritten():
    assert set(legalize_map()) >= {"relax.exp", "relax.erf", "relax.nn.gelu", "relax.nn.softmax"}
    x = torch.linspace(-3, 3, 64, dtype=torch.float64).reshape(4, 16)
    compiled = backends.compile(capture(_Exp(), (x,), name="exp64"), "llvm")
    assert torch.allclose(compiled(x), torch.exp(x), rtol=1e-12)


@pytest.mark.parametrize("size,expected", [(50, 10), (64, 8), (384, 24), (13, None), (2, None)])
def test_accumulator_count_divides_and_balances(size, expected):
    assert accumulator_count(size) == expected


def test_row_reductions_match_eager():
    torch.manual_seed(0)
    model = Norms().eval()
    inputs = (torch.randn(8, 4, 50, 50) * 5, torch.randn(2, 128, 384), torch.randn(8, 50, 64))
    compiled = backends.compile(capture(model, inputs, name="norms"), "llvm")
    for got, expected in zip(compiled(*inputs), model(*inputs)):
        assert (got - expected).abs().max().item() < 1e-5
