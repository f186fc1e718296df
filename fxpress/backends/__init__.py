"""Backends: compile an IR Graph for a target and load saved compiled models.

    compiled = fxpress.backends.compile(graph, "llvm")    # or "onnx", "native", "cuda", "aarch64", "c"
    compiled(*inputs); compiled.save("out/"); fxpress.backends.load("out/")

Both go through the backend registry (:mod:`fxpress.backends.registry`),
which also registers every target with the passes layer, here and only
here, so ``check_target`` and ``PassManager(..., target=...)`` know them.
Ops that passes insert reach TVM through :func:`register_lowering`; an op
without a rule is a LoweringError naming the op and node.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fxpress.backends.artifact import CompiledModel
from fxpress.backends.registry import backend_for_target, register_lowering_targets
from fxpress.backends.targets import TargetSpec, available_targets, get_target, register_target
from fxpress.backends.tvm.rules import RuleContext, register_lowering, registered_lowerings
from fxpress.errors import FxpressError, LoweringError
from fxpress.ir import Graph

log = logging.getLogger(__name__)

register_lowering_targets()


def compile(graph: Graph, target: str = "llvm", *, dynamic: bool = False, **options: Any) -> CompiledModel:  # noqa: A001
    """Compile `graph` for `target` into a CompiledModel.

    dynamic: keep the graph's dynamic dims (otherwise shapes are those of the
    example inputs, which lets schedules and tuning specialize).
    TVM targets also take:
    tune_trials: MetaSchedule trials (llvm only), spread over the heaviest functions; every
    function's default schedule is measured and recorded too, so tuning never loses to it.
    tuning_dir: the JSON tuning database; a later compile with the same folder reuses it
    (functions with a record are not tuned again). Without it, a temporary folder.
    schedule: apply fxpress's default CPU schedules (False: TVM's naive loops).
    max_sizes: with dynamic, the largest size of each dynamic dim (an int for all, or {label: int} by the
    signature's labels, ``d0`` for dim 0): intermediates then share storages planned for those sizes,
    as a static build's do, instead of one allocation each, and larger inputs are refused.
    dump_ir: a folder for the IR as TVMScript text: the Relax module lowered from the graph
    (00_lowered.relax.py), and the module after fusion and after scheduling (01_fused.tir.py,
    02_scheduled.tir.py), the TIR that the build turns into code.
    """
    if not isinstance(graph, Graph):
        raise LoweringError(f"compile expects an fxpress Graph (fxpress.capture), got {type(graph).__name__}")
    spec = get_target(target)
    start = time.perf_counter()
    backend = backend_for_target(spec.name)
    backend.check(graph)
    built = backend.build(graph, spec.name, dynamic=dynamic, **options)
    info = dict(built.info)
    info["compile_s"] = round(time.perf_counter() - start, 3)
    log.info("compiled %s for %s in %.1f s", graph.name, target, info["compile_s"])
    compiled = CompiledModel(executable=built.executable, inputs=built.inputs, target=spec.name, name=graph.name,
                             info=info, structure=built.structure)
    if spec.runs_on_host() and spec.name != "cuda":  # cuda models take device tensors: not tried here
        _try_once(compiled, graph)
    return compiled


def _try_once(compiled: CompiledModel, graph: Graph) -> None:
    """Run the compiled model on the example inputs, so a backend that fails at run time, or returns
    outputs of other shapes or dtypes than the graph's, fails here as a LoweringError."""
    try:
        compiled(*graph.example_inputs)
    except FxpressError as err:
        raise LoweringError(f"compiled {graph.name} for {compiled.target}, but it fails on the example "
                            f"inputs: {err}") from err


def load(folder: str | Path) -> CompiledModel:
    """Load a model saved with ``CompiledModel.save``; ArtifactError when it is damaged or mismatched."""
    return CompiledModel.load(folder)


__all__ = ["CompiledModel", "RuleContext", "TargetSpec", "available_targets", "compile", "get_target", "load",
           "register_lowering", "register_target", "registered_lowerings"]
