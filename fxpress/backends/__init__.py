"""Backends: compile an IR Graph for a target and load saved compiled models.

    compiled = fxpress.backends.compile(graph, "llvm")    # or "onnx", "cuda", "aarch64", "c"
    compiled(*inputs); compiled.save("out/"); fxpress.backends.load("out/")

Ops that passes insert reach TVM through :func:`register_lowering`; an op
without a rule is a LoweringError naming the op and node.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from fxpress.backends.targets import TargetSpec, available_targets, get_target, register_target
from fxpress.backends.tvm.rules import RuleContext, register_lowering, registered_lowerings
from fxpress.errors import LoweringError
from fxpress.ir import Graph
from fxpress.backends.artifact import CompiledModel

log = logging.getLogger(__name__)


def compile(graph: Graph, target: str = "llvm", *, dynamic: bool = False, tune_trials: int = 0,
            tuning_dir: str | Path | None = None, schedule: bool = True) -> CompiledModel:  # noqa: A001
    """Compile `graph` for `target` into a CompiledModel.

    dynamic: keep the graph's dynamic dims (otherwise shapes are those of the
    example inputs, which lets schedules and tuning specialize).
    tune_trials: MetaSchedule trials (llvm only), spread over the heaviest functions; every
    function's default schedule is measured and recorded too, so tuning never loses to it.
    tuning_dir: the JSON tuning database; a later compile with the same folder reuses it
    (functions with a record are not tuned again). Without it, a temporary folder.
    schedule: apply fxpress's default CPU schedules (False: TVM's naive loops).
    """
    if not isinstance(graph, Graph):
        raise LoweringError(f"compile expects an fxpress Graph (fxpress.capture), got {type(graph).__name__}")
    spec = get_target(target)
    start = time.perf_counter()
    if spec.backend == "onnx":
        from fxpress.backends.onnx import build_onnx

        executable, inputs = build_onnx(graph, dynamic=dynamic)
        info = {}
    else:
        executable, inputs, info = _build_tvm(graph, spec, dynamic=dynamic, tune_trials=tune_trials,
                                              tuning_dir=tuning_dir, schedule=schedule)
    info["compile_s"] = round(time.perf_counter() - start, 3)
    log.info("compiled %s for %s in %.1f s", graph.name, target, info["compile_s"])
    return CompiledModel(executable=executable, inputs=inputs, target=spec.name, name=graph.name, info=info)


def _build_tvm(graph: Graph, spec: TargetSpec, *, dynamic: bool, tune_trials: int,
               tuning_dir: str | Path | None, schedule: bool):
    from fxpress.backends.tvm.build import build_executable
    from fxpress.backends.tvm.lowering import to_relax

    lowered = to_relax(graph, dynamic=dynamic)
    info: dict = {}
    database = None
    if tune_trials or tuning_dir:
        database, info["tuning"] = _tune(lowered, spec, tune_trials, tuning_dir, fast_math=schedule)
    executable, seconds = build_executable(lowered, spec, database_dir=database, schedule=schedule)
    info["tvm_compile_s"] = round(seconds, 3)
    return executable, lowered.inputs, info


def _tune(lowered, spec: TargetSpec, trials: int, tuning_dir: str | Path | None,
          fast_math: bool) -> tuple[str, dict]:
    """Tune into `tuning_dir` (a temporary folder when None); returns the folder and a summary."""
    import tempfile

    from fxpress.backends.tvm.build import make_target
    from fxpress.backends.tvm.pipeline import fused_module
    from fxpress.backends.tvm.tuning import tune

    if spec.name != "llvm":
        raise LoweringError(f"MetaSchedule tuning is implemented for target 'llvm' only, not {spec.name!r}")
    if trials < 0:
        raise LoweringError(f"tune_trials must be >= 0, got {trials}")
    folder = str(tuning_dir) if tuning_dir else tempfile.mkdtemp(prefix="fxpress-tuning-")
    target = make_target(spec)
    report = tune(fused_module(lowered.mod, target, fast_math=fast_math), target, folder, trials)  # as the build
    summary = {"dir": folder, "tasks": report.tasks, "tuned": len(report.tuned), "trials": report.trials,
               "seconds": round(report.seconds, 2)}
    return folder, summary


def load(folder: str | Path) -> CompiledModel:
    """Load a model saved with ``CompiledModel.save``; ArtifactError when it is damaged or mismatched."""
    return CompiledModel.load(folder)


__all__ = ["CompiledModel", "RuleContext", "TargetSpec", "available_targets", "compile", "get_target", "load",
           "register_lowering", "register_target", "registered_lowerings"]
