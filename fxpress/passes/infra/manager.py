"""PassManager: runs a pipeline of passes with instruments and per-pass reports.

    pm = PassManager("fold-constants,dce", instruments=[VerifyAfterPass(), NumericCheck()])
    result = pm.run(graph, PassContext(calibration=batches))
    result.graph, result.reports

A failure inside a pass is re-raised as PassError naming the pass and the
passes that ran before it.  Passes are functional: the manager checks that
the graph a pass received is unchanged after it ran.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from fxpress.errors import CalibrationError, FxpressError, PassError
from fxpress.ir.builder import origin
from fxpress.ir.graph import Graph
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.instruments import Instrument
from fxpress.passes.infra.registry import format_pipeline, parse_pipeline
from fxpress.passes.infra.targets import LoweringTarget, check_target

log = logging.getLogger(__name__)


@dataclass
class PassReport:
    """One row of the per-pass table."""

    pass_text: str
    modified: bool
    time_s: float
    before: dict[str, int]
    after: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)
    error: dict[str, float] | None = None  # filled by NumericCheck when outputs changed
    ran_before: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_text, "modified": self.modified, "time_s": self.time_s,
                "before": self.before, "after": self.after, "stats": self.stats, "error": self.error}


@dataclass
class PipelineResult:
    graph: Graph
    reports: list[PassReport]

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.reports)


def _fingerprint(graph: Graph) -> tuple:
    """What a pass must not change in its input: code, tensors (identity and in-place
    version counter), metadata objects."""
    return (graph.module.code, tuple((k, id(v), v._version) for k, v in graph.owned_tensors().items()),
            tuple(id(n.meta.get("fxpress")) for n in graph.fx.nodes))


class PassManager:
    """Runs passes in order; each gets the previous pass's graph."""

    def __init__(self, passes: str | Sequence[Pass], instruments: Sequence[Instrument] = (),
                 target: str | LoweringTarget | None = None):
        """`target`: a compilation target (name or LoweringTarget); the pipeline is checked against it here,
        before anything runs: a pass whose ops the target cannot lower is a PipelineError naming the
        pass, the op and the targets that can."""
        self.passes: list[Pass] = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        self.instruments = list(instruments)
        if target is not None:
            check_target(self.passes, target)

    def __str__(self) -> str:
        return format_pipeline(self.passes)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> PipelineResult:
        ctx = ctx or PassContext()
        for batch in ctx.calibration:
            check_inputs(graph, batch)
        for instrument in self.instruments:
            instrument.before_pipeline(graph, ctx)
        reports: list[PassReport] = []
        for pass_ in self.passes:
            graph, report = self._run_one(pass_, graph, ctx, tuple(r.pass_text for r in reports))
            reports.append(report)
        for instrument in self.instruments:
            instrument.after_pipeline(graph, reports)
        return PipelineResult(graph, reports)

    def _run_one(self, pass_: Pass, graph: Graph, ctx: PassContext, ran_before: tuple[str, ...]):
        text = str(pass_)
        for instrument in self.instruments:
            instrument.before_pass(pass_, graph, ctx)
        before_figures, fingerprint = graph.figures(), _fingerprint(graph)
        start = time.perf_counter()
        try:
            pass_.requires(graph, ctx)
            result = pass_(graph, ctx)
            if isinstance(result, PassResult) and result.modified:
                pass_.ensures(result.graph)
        except PassError as err:
            raise err.in_pipeline(pass_.name, ran_before) from err
        except FxpressError:
            raise
        except Exception as err:  # noqa: BLE001 - any crash inside a pass is that pass's failure
            raise PassError(f"{type(err).__name__}: {err}", pass_.name, ran_before) from err
        elapsed = time.perf_counter() - start
        _check_result(result, pass_.name, ran_before)
        if _fingerprint(graph) != fingerprint:
            raise PassError("changed the graph it was given; passes must copy before rewriting "
                            "(graph.copy())", pass_.name, ran_before)
        if result.preserved and result.graph is not graph:
            ctx.analyses.preserve(graph, result.graph, tuple(result.preserved))
        report = PassReport(text, result.modified, elapsed, before_figures, result.graph.figures(),
                            dict(result.stats), ran_before=ran_before)
        for instrument in self.instruments:
            instrument.after_pass(pass_, graph, result, ctx, report)
        log.debug("ran %s in %.3f s (modified=%s)", text, elapsed, result.modified)
        return result.graph, report


def _check_result(result: Any, pass_name: str, ran_before: tuple[str, ...]) -> None:
    """The contract on what a pass returns: a PassResult; a reason when nothing changed; provenance on
    every op node when something did (cheap; the full checks are VerifyAfterPass's)."""
    if not isinstance(result, PassResult):
        raise PassError(f"returned {type(result).__name__}, not PassResult", pass_name, ran_before)
    if not result.modified:
        if not result.stats.get("reason"):
            raise PassError("returned modified=False without saying why; put a 'reason' in its stats",
                            pass_name, ran_before)
        return
    for node in result.graph.fx.nodes:
        if node.op == "call_function" and origin(node) is None:
            raise PassError(f"created {node.format_node()} without provenance; create nodes through "
                            "fxpress.ir.builder.Builder", pass_name, ran_before)


def check_inputs(graph: Graph, batch: Any) -> None:
    """Raise CalibrationError unless `batch` matches the graph's example inputs.

    Counts, dtypes and ranks must match; sizes must match except on dims the
    graph was captured as dynamic.
    """
    if not isinstance(batch, (tuple, list)):
        raise CalibrationError(f"{graph.name}: a calibration batch must be a tuple of inputs like "
                               f"the example inputs, got {type(batch).__name__}")
    expected = graph.example_inputs
    if len(batch) != len(expected):
        raise CalibrationError(f"{graph.name}: a calibration batch has {len(batch)} inputs, "
                               f"the model takes {len(expected)}")
    dynamic = graph.dynamic_shapes or ()
    for index, (got, want) in enumerate(zip(batch, expected)):
        if not isinstance(want, torch.Tensor):
            continue
        free = set((dynamic[index] or {}).keys()) if index < len(dynamic) else set()
        if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.dim() != want.dim() or any(
                g != w for d, (g, w) in enumerate(zip(got.shape, want.shape)) if d not in free):
            got_text = f"{got.dtype}{list(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise CalibrationError(
                f"{graph.name}: calibration input {index} is {got_text}, the graph expects "
                f"{want.dtype}{list(want.shape)}" + (f" (dims {sorted(free)} may vary)" if free else
                                                     " (captured with static shapes; capture with "
                                                     "dynamic=... to vary them)"))
