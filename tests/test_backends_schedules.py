"""The default CPU schedules: they apply to matmul-like functions and keep results exact."""
from __future__ import annotations

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
