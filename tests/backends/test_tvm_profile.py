"""profile_calls: per-function time of a compiled TVM model, from the VM's call instrument."""
from __future__ import annotations

import pytest
import torch

from fxpress import backends
from fxpress.backends.tvm.profile import profile_calls
from fxpress.errors import LoweringError
from fxpress.ir import capture

torch.set_num_threads(1)


def test_the_big_matmul_is_the_slowest_call_and_rows_add_up():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 4)).eval()
    x = torch.randn(64, 256)
    compiled = backends.compile(capture(model, (x,), name="mlp"), "llvm")
    rows = profile_calls(compiled, (x,), rounds=5)
    assert rows == sorted(rows, key=lambda row: -row["ms"])
    assert abs(sum(row["share"] for row in rows) - 1.0) < 0.01
    kernels = [row for row in rows if not row["function"].startswith("vm.builtin")]
    # 256 x 1024 MACs per row (with its bias and ReLU fused) against 1024 x 4
    assert "matmul" in kernels[0]["function"] and kernels[0]["calls"] == 1
    assert kernels[0]["ms"] > 5 * max(row["ms"] for row in kernels[1:])
    with torch.no_grad():  # the compiled model itself still runs as before
        assert (compiled(x) - model(x)).abs().max().item() < 1e-4


def test_a_model_not_compiled_for_tvm_is_refused():
    model = torch.nn.Linear(4, 4).eval()
    x = torch.randn(2, 4)
    compiled = backends.compile(capture(model, (x,), name="lin"), "onnx")
    with pytest.raises(LoweringError, match="compile it with target='llvm'"):
        profile_calls(compiled, (x,))
