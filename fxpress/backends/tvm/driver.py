"""Graph -> TVM executable for one target: lower to Relax, tune if asked, build (the TVM backend's build)."""
from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

import torch

from fxpress.backends.targets import TargetSpec
from fxpress.errors import LoweringError
from fxpress.ir import Graph
from fxpress.ir.opinfo import op_label


def build_tvm(graph: Graph, spec: TargetSpec, *, dynamic: bool, tune_trials: int,
              tuning_dir: str | Path | None, schedule: bool, dump_ir: str | Path | None = None,
              rpc: str | None = None, rpc_key: str | None = None,
              max_sizes: int | dict[str, int] | None = None) -> tuple:
    """(executable, input signature, IOStructure, info) for `graph` compiled for `spec`.

    tune_trials / tuning_dir: MetaSchedule tuning (llvm only) into a JSON database; a later build with
    the same folder reuses it.  rpc ("HOST:PORT" of a TVM RPC tracker) and rpc_key (its servers' key):
    time the tuning candidates on that remote device (fxpress.backends.tvm.rpc).
    schedule: fxpress's default CPU schedules (False: TVM's naive loops).
    dump_ir: a folder for the IR as TVMScript text: ``00_lowered.relax.py`` (the Relax module lowered
    from the graph), ``01_fused.tir.py`` and ``02_scheduled.tir.py`` (before and after the schedules).
    max_sizes: bounds of the dynamic dims (:func:`.lowering.bound_dynamic_dims`).
    """
    from fxpress.backends.tvm import load_rules
    from fxpress.backends.tvm.build import build_executable
    from fxpress.backends.tvm.lowering import bound_dynamic_dims, to_relax
    from fxpress.backends.tvm.pipeline import write_ir

    load_rules()
    lowered = to_relax(graph, dynamic=dynamic)
    upper_bounds = None if max_sizes is None else bound_dynamic_dims(lowered, max_sizes, graph.name)
    if dump_ir is not None:
        write_ir(lowered.mod, dump_ir, "00_lowered.relax.py")
    info: dict = {}
    database = None
    if tune_trials or tuning_dir or rpc or rpc_key:
        database, info["tuning"] = tune_lowered(lowered, spec, tune_trials, tuning_dir, fast_math=schedule,
                                                rpc=rpc, rpc_key=rpc_key)
    try:
        executable, seconds = build_executable(lowered, spec, database_dir=database, schedule=schedule,
                                               dump_ir=dump_ir, upper_bounds=upper_bounds)
    except LoweringError as err:
        blamed = blame_intrinsic(graph, spec.name, str(err))
        if blamed is None:
            raise
        raise blamed from err
    info["tvm_compile_s"] = round(seconds, 3)
    return executable, lowered.inputs, lowered.structure, info


_INTRINSIC = re.compile(r'name="tirx?\.([A-Za-z0-9_]+)"')


def blame_intrinsic(graph: Graph, target: str, message: str) -> LoweringError | None:
    """For TVM's "unknown intrinsic tirx.X" (no code for X on this target): a LoweringError naming the
    graph's first node that runs op X; None when the message is another failure or no node runs X."""
    found = _INTRINSIC.search(message)
    if found is None:
        return None
    intrinsic = found.group(1)
    for node in graph.fx.nodes:
        if node.op == "call_function" and op_label(node.target).split(".")[1:2] == [intrinsic]:
            return LoweringError(f"op {op_label(node.target)} at node {node.name} of graph {graph.name}: TVM has no "
                                 f"{target} code for {intrinsic} (intrinsic tirx.{intrinsic}); compile with "
                                 f"schedule=False or for target 'onnx'")
    return None


def tune_lowered(lowered, spec: TargetSpec, trials: int, tuning_dir: str | Path | None,
                 fast_math: bool, rpc: str | None = None, rpc_key: str | None = None) -> tuple[str, dict]:
    """Tune into `tuning_dir` (a temporary folder when None); returns the folder and a summary.
    rpc / rpc_key: measure through that RPC tracker (llvm, or aarch64 on a board's server)."""
    from fxpress.backends.tvm.build import make_target
    from fxpress.backends.tvm.pipeline import fused_module
    from fxpress.backends.tvm.rpc import parse_remote
    from fxpress.backends.tvm.tuning import tune

    remote = parse_remote(rpc, rpc_key)
    if remote is not None and spec.name not in ("llvm", "aarch64"):
        raise LoweringError(f"rpc tuning is for targets 'llvm' and 'aarch64', not {spec.name!r}")
    if remote is None and spec.name != "llvm":
        raise LoweringError(f"MetaSchedule tuning is implemented for target 'llvm' only, not {spec.name!r} "
                            f"(aarch64: tune on the board through an RPC tracker, rpc= and rpc_key=)")
    if trials < 0:
        raise LoweringError(f"tune_trials must be >= 0, got {trials}")
    if remote is not None and not trials:
        raise LoweringError(f"rpc={remote.address} times tuning candidates on a remote device: pass "
                            "tune_trials > 0 (--tune-trials N) too")
    root = str(tuning_dir) if tuning_dir else tempfile.mkdtemp(prefix="fxpress-tuning-")
    target = make_target(spec)
    key = records_key(target, torch.get_num_threads())
    folder = str(Path(root) / key)
    # the module exactly as the build fuses it (GEMV weight packing goes with the schedules)
    report = tune(fused_module(lowered.mod, target, fast_math=fast_math, gemv=fast_math), target, folder, trials,
                  remote=remote)
    minutes = report.seconds / 60
    summary = {"dir": folder, "key": key, "tasks": report.tasks, "tuned": len(report.tuned), "trials": report.trials,
               "seconds": round(report.seconds, 2), "cost_model": report.cost_model,
               "rpc": report.rpc,
               "trials_per_minute": round(report.trials / minutes, 1) if report.trials and minutes else None}
    return folder, summary


def records_key(target, threads: int) -> str:
    """The sub-folder of a tuning dir that holds records for one target and thread count: schedules
    tuned for one are not the best for another (``llvm-<hash of the target>-t<threads>``)."""
    digest = hashlib.sha1(str(target).encode()).hexdigest()[:10]
    return f"{target.kind.name}-{digest}-t{threads}"
