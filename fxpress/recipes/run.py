"""Run a checked recipe on a loaded model: the one path `fxpress.compress` and `fxpress run --recipe` share.

capture -> calibration batches -> PassManager (verify + numeric check after every pass) -> evaluation
-> compilation -> exports -> report, each step only when the recipe asks for it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from fxpress.backends import compile as compile_graph
from fxpress.errors import FxpressError
from fxpress.eval import calibration_batches, check_evaluable, describe_data, evaluate, task_loss_for
from fxpress.ir import Graph, capture
from fxpress.passes import Instrument, NullProgress, NumericCheck, PassContext, PassManager, VerifyAfterPass
from fxpress.passes.infra.base import Progress
from fxpress.passes.infra.manager import PipelineResult
from fxpress.recipes.compressed import Compressed
from fxpress.recipes.recipe import EAGER, SELF_TEACHER, Recipe
from fxpress.zoo import ZooModel
from fxpress.zoo.specs import resolve_model

log = logging.getLogger(__name__)


def run_recipe(model: ZooModel, recipe: Recipe, *, batches: Sequence[tuple] | None = None,
               teacher: Any = None, progress: Progress | None = None,
               instruments: Sequence[Instrument] = ()) -> Compressed:
    """Compress `model` as `recipe` says (the recipe is checked first).

    `batches`: calibration inputs to use instead of the recipe's source; `teacher`: a module or Graph
    instead of the recipe's teacher; `instruments` run after fxpress's verification and numeric check.
    """
    recipe.check()
    check_data(model, recipe)
    graph = capture_model(model)
    recorder = _recorder() if recipe.report else None
    result = run_passes(model, graph, recipe, batches=batches, teacher=teacher, progress=progress,
                        instruments=[*instruments, *([recorder] if recorder else [])])
    done = Compressed(graph=result.graph, before=graph, reports=result.reports, compiled=None, recipe=recipe,
                      model=model, recorder=recorder)
    if recipe.eval is not None:
        done.metrics = metrics_before_after(model, graph, result.graph, recipe)
    if recipe.target != EAGER:
        done.compiled = compile_for_recipe(result.graph, recipe)
    write_outputs(done)
    return done


def run_passes(model: ZooModel, graph: Graph, recipe: Recipe, *, batches: Sequence[tuple] | None = None,
               teacher: Any = None, progress: Progress | None = None, instruments: Sequence[Instrument] = (),
               checks: bool = True) -> PipelineResult:
    """The recipe's pipeline on a captured `graph`, with the context `fxpress run` gives passes: its
    calibration batches (or `batches`), teacher (or `teacher`), seed and the model's task loss.

    `checks=False` leaves out verification and the numeric check after each pass (they never change the
    graph; a sweep re-running a checked point skips them)."""
    manager = PassManager(recipe.pipeline, target=None if recipe.target == EAGER else recipe.target)
    if batches is None:
        source = recipe.calibration
        batches = calibration_batches(model, count=source.batches, source=source.source, like=graph,
                                      split=source.split) if source.batches else []
    ctx = PassContext(calibration=list(batches), teacher=teacher if teacher is not None else teacher_of(model, recipe),
                      seed=recipe.seed, progress=progress or NullProgress(), loss=task_loss_for(model))
    manager.instruments = [*([VerifyAfterPass(), NumericCheck()] if checks else []), *instruments]
    return manager.run(graph, ctx)


def check_data(model: ZooModel, recipe: Recipe) -> None:
    """Before the slow work: the calibration and evaluation sources fit the model's task (DataError)."""
    if recipe.calibration.batches and recipe.calibration.source != "default":
        check_evaluable(model, recipe.calibration.source, "calibration")
    if recipe.eval is not None:
        check_evaluable(model, recipe.eval.source)


def capture_model(model: ZooModel) -> Graph:
    """Capture as `fxpress run` does: export, with the model's dynamic dims (static when it has none)."""
    return capture(model.module, model.example_inputs, dynamic=model.dynamic_dims or False, method="export",
                   name=model.name)


def teacher_of(model: ZooModel, recipe: Recipe) -> torch.nn.Module:
    """The module distillation learns from: the input model (``self``) or the model the spec names."""
    if recipe.teacher == SELF_TEACHER:
        return model.module
    try:
        return resolve_model(recipe.teacher).module
    except FxpressError as err:
        raise recipe.fail("teacher", str(err)) from err


def metrics_before_after(model: ZooModel, before: Graph, after: Graph, recipe: Recipe) -> dict[str, tuple]:
    """``{"<metric> (<data>)": (before, after)}`` on the recipe's eval source."""
    source, items = recipe.eval.source, recipe.eval.items
    scored_before = evaluate(model, before, source, max_items=items)
    scored_after = evaluate(model, after, source, max_items=items)
    data = describe_data(model, source)
    return {f"{name} ({data})": (value, scored_after.get(name)) for name, value in scored_before.items()}


def compile_for_recipe(graph: Graph, recipe: Recipe):
    """The compressed graph compiled for the recipe's target (with its tuning options on TVM targets)."""
    if recipe.target == "native":  # the bit kernels keep the graph's dynamic dims, as `fxpress run` does
        return compile_graph(graph, "native", dynamic=bool(graph.dynamic_shapes))
    return compile_graph(graph, recipe.target, tune_trials=recipe.tuning.trials, tuning_dir=recipe.tuning.dir)


def write_outputs(done: Compressed) -> None:
    """The recipe's exports and report; what was written goes to ``done.written``."""
    export = done.recipe.export
    if export.compiled:
        done.written["compiled"] = done.save_compiled(export.compiled)
    if export.hf:
        done.written["hf"] = Path(done.to_hf(export.hf))
    if done.recipe.report:
        done.written["report"] = done.write_report(done.recipe.report)
    for key, path in done.written.items():
        log.info("wrote %s: %s", key, path)


def _recorder() -> Instrument:
    from fxpress.report import RunRecorder

    return RunRecorder()
