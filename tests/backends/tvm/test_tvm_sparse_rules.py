"""fxpress::sparse_linear compiles for llvm (token-minor TIR SpMM) and matches eager, both forms."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.backends import registry
from fxpress.ops.sparse import SPARSE_LINEAR, compress_weight
from fxpress.passes.infra.targets import get_lowering_target

torch.set_num_threads(1)


class TwoSparseLayers(torch.nn.Module):
    """A 4x1-block layer (out 10: a padded last block row) with bias, then a CSR layer without."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        first = torch.randn(10, 24, generator=generator)
        first *= (torch.rand(3, 24, generator=generator) < 0.3).repeat_interleave(4, 0)[:10]
        second = torch.randn(7, 10, generator=generator) * (torch.rand(7, 10, generator=generator) < 0.4)
        for name, weight, rows in (("a", first, 4), ("b", second, 1)):
            packed = compress_weight(weight, rows)
            self.register_buffer(f"{name}_values", packed.values)
            self.register_buffer(f"{name}_col", packed.col_index)
            self.register_buffer(f"{name}_ptr", packed.row_ptr)
        self.bias = torch.nn.Parameter(torch.randn(10))

    def forward(self, x):
        y = SPARSE_LINEAR(x, self.a_values, self.a_col, self.a_ptr, self.bias, 10).relu()
        return SPARSE_LINEAR(y, self.b_values, self.b_col, self.b_ptr, None, 7)


@pytest.mark.parametrize("tokens", [5, 16, 37])
def test_compiled_equals_eager(tokens):
    model = TwoSparseLayers().eval()
    x = torch.randn(2, tokens, 24)
    graph = fxpress.capture(model, (x,))
    compiled = fxpress.compile(graph, "llvm")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_dynamic_batch_runs_the_scalar_tail():
    model = TwoSparseLayers().eval()
    graph = fxpress.capture(model, (torch.randn(2, 9, 24),), dynamic=True)
    compiled = fxpress.compile(graph, "llvm", dynamic=True)
    for batch in (1, 3):
        x = torch.randn(batch, 9, 24)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_targets_can_lower_sparse_linear():
    for target in ("llvm", "native"):
        assert get_lowering_target(target).can_lower(SPARSE_LINEAR)
    assert not get_lowering_target("onnx").can_lower(SPARSE_LINEAR)
    assert registry.get_backend("tvm").can_lower("fxpress::sparse_linear", "llvm")
