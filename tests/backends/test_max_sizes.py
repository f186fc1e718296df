"""Dynamic TVM builds with bounded dims (``compile(..., dynamic=True, max_sizes=...)``): memory planned once
as a static build's is, the bound in the signature and the manifest, larger inputs refused by name."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress.backends.signature import TensorSpec
from fxpress.backends.tvm.profile import profile_calls
from fxpress.errors import ArtifactError, LoweringError

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(24, 48), nn.LayerNorm(48), nn.Linear(48, 24)

    def forward(self, x):
        return (x + self.down(nn.functional.gelu(self.norm(self.up(x))))).softmax(-1)


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    return model, fxpress.capture(model, (torch.randn(2, 7, 24),), dynamic=True, name="blocks")


@pytest.fixture(scope="module")
def bounded(graph):
    return fxpress.compile(graph[1], "llvm", dynamic=True, max_sizes=8)


def _storages(compiled, x) -> int:
    rows = profile_calls(compiled, (x,), rounds=1, warmup=0)
    return sum(row["calls"] for row in rows if row["function"] == "vm.builtin.alloc_storage")


def test_a_bounded_dynamic_build_allocates_as_few_storages_as_the_static_one(graph, bounded):
    model, captured = graph
    x = torch.randn(2, 7, 24)
    static = _storages(fxpress.compile(captured, "llvm"), x)
    unbounded = _storages(fxpress.compile(captured, "llvm", dynamic=True), x)
    assert _storages(bounded, x) == static < unbounded
    for batch in (1, 5, 8):
        x = torch.randn(batch, 7, 24)
        torch.testing.assert_close(bounded(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_bound_is_in_the_signature_and_survives_a_save(bounded, tmp_path):
    spec = bounded.inputs[0]
    assert spec.bounds == {0: 8} and spec.type_str() == "float32[d0<=8, 7, 24]"
    assert TensorSpec.from_json(spec.to_json()) == spec
    loaded = fxpress.load(bounded.save(tmp_path / "blocks"))
    assert loaded.inputs == bounded.inputs
    x = torch.randn(8, 7, 24)
    torch.testing.assert_close(loaded(x), bounded(x))
    for runner in (bounded, loaded):
        with pytest.raises(ArtifactError, match=r"d0 = 9 > 8: .*larger max_sizes"):
            runner(torch.randn(9, 7, 24))


@pytest.mark.parametrize("max_sizes, message", [
    ({"batch": 8}, r"names 'batch', not dynamic dims of graph blocks; its dynamic dims are 'd0'"),
    (1, r"max_sizes\['d0'\] = 1 is below the example input .* size 2"),
    ({"d0": 0}, r"must be an int >= 1, got 0"),
    (8.0, r"an int or a dict"),
])
def test_bad_max_sizes_get_one_clear_error(graph, max_sizes, message):
    with pytest.raises(LoweringError, match=message):
        fxpress.compile(graph[1], "llvm", dynamic=True, max_sizes=max_sizes)


def test_max_sizes_needs_a_dynamic_tvm_build(graph):
    with pytest.raises(LoweringError, match="compile with dynamic=True"):
        fxpress.compile(graph[1], "llvm", max_sizes=8)
    with pytest.raises(LoweringError, match="max_sizes apply to TVM targets only"):
        fxpress.compile(graph[1], "onnx", dynamic=True, max_sizes=8)
