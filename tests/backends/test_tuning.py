"""MetaSchedule tuning (llvm): in-process builder/runner, a JSON database reused by the next compile.

One tuning run per session (module fixture): ~40 s, most of it TVM importing its tensor
intrinsics when the first TuneContext is made.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fxpress import backends
from fxpress.errors import LoweringError
from fxpress.ir import capture
from model_factories import TuningBlock as Block

TRIALS = 8


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(32, 64)
    graph = capture(model, (x,), name="block")
    folder = tmp_path_factory.mktemp("tuning")
    first = backends.compile(graph, "llvm", tune_trials=TRIALS, tuning_dir=folder)
    return model, x, graph, folder, first


def test_tuning_records_every_function_and_matches_eager(tuned):
    model, x, _, folder, first = tuned
    report = first.info["tuning"]
    assert report["tuned"] >= 1 and report["trials"] == TRIALS and report["tasks"] >= 3
    assert report["cost_model"] == "xgb" and report["trials_per_minute"] > 0  # xgboost-cpu is pinned
    records_dir = Path(report["dir"])
    assert records_dir.parent == folder and records_dir.name == report["key"]
    assert report["key"].startswith("llvm-") and report["key"].endswith(f"-t{torch.get_num_threads()}")
    records = (records_dir / "database_tuning_record.json").read_text().splitlines()
    workloads = (records_dir / "database_workload.json").read_text().splitlines()
    assert len(workloads) == report["tasks"] and len(records) >= report["tasks"] + 1
    assert all(json.loads(line) for line in records)
    assert (first(x) - model(x)).abs().max().item() < 1e-5


def test_second_compile_reuses_database_without_trials(tuned):
    model, x, graph, folder, first = tuned
    records = Path(first.info["tuning"]["dir"]) / "database_tuning_record.json"
    records_before = records.read_text()
    again = backends.compile(graph, "llvm", tune_trials=TRIALS, tuning_dir=folder)
    assert again.info["tuning"]["tuned"] == 0 and again.info["tuning"]["trials"] == 0
    assert again.info["tuning"]["seconds"] < 5
    assert records.read_text() == records_before
    assert torch.equal(again(x), first(x))


def test_records_are_kept_per_thread_count(tuned):
    """Schedules tuned at one thread count land in their own folder; another count starts afresh."""
    _, x, graph, folder, first = tuned
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        other = backends.compile(graph, "llvm", tuning_dir=folder)
    finally:
        torch.set_num_threads(threads)
    assert other.info["tuning"]["key"].endswith(f"-t{threads + 1}")
    assert other.info["tuning"]["dir"] != first.info["tuning"]["dir"]
    assert other.info["tuning"]["tasks"] == first.info["tuning"]["tasks"]


def test_tuning_dir_alone_applies_the_database(tuned):
    model, x, graph, folder, _ = tuned
    applied = backends.compile(graph, "llvm", tuning_dir=folder)
    assert applied.info["tuning"]["trials"] == 0
    assert (applied(x) - model(x)).abs().max().item() < 1e-5


def test_tuning_other_targets_is_a_clear_error(tuned):
    graph = tuned[2]
    with pytest.raises(LoweringError, match="target .llvm. only"):
        backends.compile(graph, "aarch64", tune_trials=4)


def test_tuning_set_up_loads_only_the_x86_intrinsics_and_leaves_the_package_importable():
    import subprocess
    import sys

    code = """
import sys, tvm
from fxpress.backends.targets import host_cpu_target
from fxpress.backends.tvm.tuning import _x86_tensor_intrinsics_only
from tvm import te
from tvm.s_tir.meta_schedule import TuneContext
a = te.placeholder((16, 16), name="a")
k = te.reduce_axis((0, 16), name="k")
c = te.compute((16, 16), lambda i, j: te.sum(a[i, k] * a[k, j], axis=k), name="c")
target = tvm.target.Target(host_cpu_target())
with _x86_tensor_intrinsics_only(target):
    TuneContext(mod=te.create_prim_func([a, c]), target=target, space_generator="post-order-apply",
                search_strategy="replay-trace").generate_design_space()
    assert "tvm.s_tir.tensor_intrin.x86" in sys.modules
    assert "tvm.s_tir.tensor_intrin.cuda" not in sys.modules
assert "tvm.s_tir.tensor_intrin" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
