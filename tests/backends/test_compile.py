"""fxpress.backends.compile: parity with eager for llvm and onnx, save/load, signature checks.

Tolerances (max abs error vs eager, float32): vit-mnist, cnn-digits, bnn-digits 1e-4,
minilm 1e-3 (6 layers of 384-wide matmuls; observed ~2e-5 on both), gdnet-lite 1e-2 (depth in mm,
about 3000; observed ~1.5e-3 on both).
Each model is compiled once per session per target (module-scoped fixtures).
"""
from __future__ import annotations

import pytest
import torch

from fxpress import backends
from fxpress.errors import ArtifactError
from fxpress.ir import capture

TOLERANCE = {"vit-mnist": 1e-4, "cnn-digits": 1e-4, "bnn-digits": 1e-4, "minilm": 1e-3, "gdnet-lite": 1e-2}
CASES = [(m, t) for m in ("vit-mnist", "cnn-digits", "bnn-digits", "minilm", "gdnet-lite") for t in ("llvm", "onnx")]


@pytest.fixture(scope="module")
def compiled(zoo_model):
    """compiled(model, target) -> (ZooModel, CompiledModel), built once per module."""
    cache: dict = {}

    def get(name: str, target: str):
        if (name, target) not in cache:
            model = zoo_model(name)
            graph = capture(model.module, model.example_inputs, dynamic=model.dynamic_dims, name=name)
            cache[name, target] = model, backends.compile(graph, target)
        return cache[name, target]

    return get


@pytest.mark.parametrize("name,target", CASES)
def test_compiled_matches_eager(compiled, name, target):
    model, compiled_model = compiled(name, target)
    with torch.no_grad():
        expected = model.module(*model.example_inputs)
    got = compiled_model(*model.example_inputs)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert (got - expected).abs().max().item() <= TOLERANCE[name]


@pytest.mark.parametrize("target", ["llvm", "onnx"])
def test_save_load_round_trip(compiled, tmp_path, target):
    model, compiled_model = compiled("vit-mnist", target)
    folder = compiled_model.save(tmp_path / "vit")
    names = sorted(p.name for p in folder.iterdir())
    assert "manifest.json" in names and "params.safetensors" in names
    assert not any(name.endswith((".pkl", ".pt", ".pickle")) for name in names)
    loaded = backends.load(folder)
    assert loaded.target == target and loaded.inputs == compiled_model.inputs
    assert torch.equal(loaded(*model.example_inputs), compiled_model(*model.example_inputs))


def test_wrong_input_shape_names_expected_and_got(compiled):
    model, compiled_model = compiled("vit-mnist", "llvm")
    bad = torch.zeros(3, 1, 28, 28)
    with pytest.raises(ArtifactError, match=r"expected float32\[2, 1, 28, 28\], got float32\[3, 1, 28, 28\]"):
        compiled_model(bad)
    with pytest.raises(ArtifactError, match="expected 1 inputs"):
        compiled_model(*model.example_inputs, bad)


def test_latency_reports_positive_times(compiled):
    _, compiled_model = compiled("cnn-digits", "llvm")
    latency = compiled_model.latency(budget_s=0.05, max_runs=5)
    assert latency.runs >= 1 and 0 < latency.min_ms <= latency.median_ms


def test_compile_info_records_times(compiled):
    _, compiled_model = compiled("vit-mnist", "llvm")
    assert compiled_model.info["compile_s"] > 0 and compiled_model.info["tvm_compile_s"] > 0


def test_tvm_thread_pool_follows_set_threads_up_to_every_cpu(compiled):
    """TVM caps its pool at half the CPUs unless TVM_NUM_THREADS is set; fxpress sets it, so 2 threads on
    a 2-core machine are really 2 (set_threads(2) was a silent no-op)."""
    import os

    import tvm

    model, compiled_model = compiled("cnn-digits", "llvm")
    pool_size = tvm.get_global_func("runtime.NumThreads")
    assert pool_size() == torch.get_num_threads()  # a compiled model starts with torch's thread count
    try:
        compiled_model.set_threads(os.cpu_count())
        assert pool_size() == os.cpu_count()
        torch.testing.assert_close(compiled_model(*model.example_inputs), model.module(*model.example_inputs),
                                   atol=1e-4, rtol=1e-4)
    finally:
        compiled_model.set_threads(1)
    assert pool_size() == 1


class ConstantRamp(torch.nn.Module):
    """Calls on constants alone (a scaled arange, a cumsum of ones): what FoldConstant folds."""

    def forward(self, x):
        return x + torch.arange(8, dtype=torch.float32) * 2 + torch.ones(8).cumsum(0)


def test_llvm_folds_calls_on_constants_alone_and_skips_the_fold_without_them():
    import tvm
    from tvm import relax

    from fxpress.backends.targets import host_cpu_target
    from fxpress.backends.tvm.lowering import to_relax
    from fxpress.backends.tvm.pipeline import _constant_only_call, fused_module

    x = torch.randn(3, 8)
    graph = capture(ConstantRamp().eval(), (x,), name="constant-ramp")
    target = tvm.target.Target(host_cpu_target())
    fused = fused_module(to_relax(graph).mod, target)
    assert not _constant_only_call(fused)  # folded: main reads one constant vector
    assert "cumsum" not in fused["main"].script() and "full" not in fused["main"].script()
    assert (backends.compile(graph, "llvm")(x) - ConstantRamp()(x)).abs().max().item() < 1e-6
    plain = capture(torch.nn.Linear(8, 4).eval(), (x,), name="linear")
    assert not _constant_only_call(relax.transform.LegalizeOps()(to_relax(plain).mod))
