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
from fxpress.runtime.artifact import CompiledModel

log = logging.getLogger(__name__)


def compile(graph: Graph, target: str = "llvm", *, dynamic: bool = False, tune_trials: int = 0,
            tuning_dir: str | Path | None = None, schedule: bool = True) -> CompiledModel:  # noqa: A001
    """Compile `graph` for `target` into a CompiledModel.

    dynamic: keep the graph's dynamic dims (otherwise shapes are those of the
    example inputs, which lets schedules and tuning specialize).
    tune_trials: MetaSchedule trials (TVM CPU targets); the database in
    `tuning_dir` is reused by the next compile of the same functions.
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
    database = None
    info: dict = {}
    if tune_trials or tuning_dir:
        raise LoweringError("MetaSchedule tuning is not available yet in fxpress (tune_trials/tuning_dir); "
                            "compile without them to use the default schedules")
    executable, seconds = build_executable(lowered, spec, database_dir=database, schedule=schedule)
    info["tvm_compile_s"] = round(seconds, 3)
    return executable, lowered.inputs, info


def load(folder: str | Path) -> CompiledModel:
    """Load a model saved with ``CompiledModel.save``; ArtifactError when it is damaged or mismatched."""
    return CompiledModel.load(folder)


__all__ = ["CompiledModel", "RuleContext", "TargetSpec", "available_targets", "compile", "get_target", "load",
           "register_lowering", "register_target", "registered_lowerings"]
