"""Sweeps: run a grid of pipelines on one model, measure each point, keep the Pareto front.

A grid is a pipeline whose option values may be bracketed lists, each an axis of values to try:

    merge-tokens{r=[0,4,8,12]}                          4 points
    merge-tokens{r=[4,8],schedule=[constant,decreasing]} 4 points (the cartesian product of the axes)
    prune-obs{layers=[fc1;fc2,fc3]}                     2 points of a list option (x=1;2 as in pipelines)

`expand_grid` turns the text into `SweepPoint`s, each with its settings (``{"merge-tokens.r": 8}``) and its
concrete pipeline, and parses every point before anything runs.  `run_sweep` runs every point exactly
as ``fxpress run`` does (same capture, calibration and seed), plus the unmodified captured graph as a
baseline, and measures the task metric, MACs, parameters and latency.  `pareto_front` keeps the points
no other point beats on every objective; `best_point` picks the recipe to keep.

Latency is measured in the parent process after every point has run, at batch 1, in rounds that
interleave the baseline and every point (so machine noise hits them alike): with ``workers > 1`` the
parent re-runs each point's pipeline to get its graph back (graphs do not cross processes), since
timings taken in parallel workers compete for the same cores.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from fxpress.errors import DataError, FxpressError, PipelineError, first_line
from fxpress.eval import Source, check_evaluable, evaluate
from fxpress.eval.evaluate import has_default_metric
from fxpress.ir import Graph
from fxpress.passes import NullProgress, parse_pipeline
from fxpress.passes.infra.base import Progress
from fxpress.utils.timing import interleaved_latency
from fxpress.eval import METRIC_GOAL
from fxpress.zoo import ZooModel
from fxpress.zoo.specs import resolve_model
from fxpress.recipes.recipe import Calibration, Recipe
from fxpress.recipes.run import capture_model, run_passes

log = logging.getLogger(__name__)

MAX_POINTS = 64  # a larger grid needs max_points=... (--max-points): each point is a full run
# Default --tolerance: the metric loss a best recipe may have against the baseline; absolute for
# accuracy and MRR (1 point), relative for the metrics where lower is better (perplexity, depth RMSE: 5 %).
DEFAULT_TOLERANCE = {"accuracy": 0.01, "mrr": 0.01, "perplexity": 0.05, "rmse_mm": 0.05}
LATENCY_ROUNDS, LATENCY_BUDGET_S = 3, 0.2  # per graph and round: 64 points take about 40 s to time


# -- grids -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPoint:
    """One point of a grid: the axis values it takes (``{"merge-tokens.r": 8}``, typed as the pass declares
    them), a short label (``r=8``) and its concrete pipeline text."""

    settings: dict[str, Any]
    pipeline: str
    label: str


@dataclass
class _Option:
    key: str
    value: str  # the text of a fixed value
    axis: list[str] | None = None  # the values of an axis


def _split(text: str, whole: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside braces and brackets; PipelineError on unbalanced ones."""
    parts, current, stack = [], [], []
    pairs = {"}": "{", "]": "["}
    closing = {"{": "}", "[": "]"}
    for ch in text:
        if ch in "{[":
            stack.append(ch)
        elif ch in pairs:
            if not stack:
                raise PipelineError(f"unbalanced '{ch}' in sweep grid {whole!r}")
            opened = stack.pop()
            if opened != pairs[ch]:
                raise PipelineError(f"unbalanced brackets in sweep grid {whole!r}: '{ch}' where "
                                    f"'{closing[opened]}' is expected")
        if ch == sep and not stack:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if stack:
        raise PipelineError(f"unbalanced '{stack[-1]}' in sweep grid {whole!r}: close it with "
                            f"'{closing[stack[-1]]}'")
    parts.append("".join(current).strip())
    return parts


def _read_pass(item: str, whole: str) -> tuple[str, list[_Option] | None]:
    """`name{k=v,k=[a,b]}` -> (name, options), or (name, None) for a bare name."""
    name, brace, body = item.partition("{")
    name = name.strip()
    if not item or not name or (brace and not body.endswith("}")) or "[" in name:
        raise PipelineError(f"cannot read pass {item!r} in sweep grid {whole!r}; write name or "
                            f"name{{option=value,option=[a,b,c],...}}")
    if not brace:
        return name, None
    options: list[_Option] = []
    for entry in _split(body[:-1], whole) if body[:-1].strip() else []:
        key, eq, value = (part.strip() for part in entry.partition("="))
        if not eq or not key:
            raise PipelineError(f"pass '{name}': option {entry!r} must be written key=value or key=[a,b,c]")
        if any(option.key == key for option in options):
            raise PipelineError(f"pass '{name}': option '{key}' is given twice in sweep grid {whole!r}")
        options.append(_Option(key, value, _axis(name, key, value, whole)))
    return name, options


def _axis(name: str, key: str, value: str, whole: str) -> list[str] | None:
    """The values of `[a,b,c]`, or None for a value that is not one bracketed list."""
    if not (value.startswith("[") and _encloses(value)):
        return None
    values = _split(value[1:-1], whole)
    if values == [""]:
        raise PipelineError(f"pass '{name}': option '{key}' has an empty grid []; list the values to try, "
                            f"e.g. {key}=[4,8]")
    if "" in values:
        raise PipelineError(f"pass '{name}': option '{key}' has an empty value in {value} "
                            "(a doubled or trailing comma?)")
    return values


def _encloses(value: str) -> bool:
    """Whether the '[' at the start of `value` closes at its end (`[1,2]`, not `[0-3].x[1]`)."""
    depth = 0
    for index, ch in enumerate(value):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth == 0:
            return index == len(value) - 1
    return False


def expand_grid(text: str, max_points: int = MAX_POINTS) -> list[SweepPoint]:
    """Every point of the grid `text` (the cartesian product of its axes, first axis slowest), each
    parsed with :func:`fxpress.passes.parse_pipeline`; PipelineError on a malformed grid or point."""
    if not text or not text.strip():
        raise PipelineError("empty sweep grid; write a pipeline with value lists, e.g. merge-tokens{r=[4,8]}")
    passes = [_read_pass(item, text) for item in _split(text.strip(), text)]
    names = [name for name, _ in passes]
    keys = [name if names.count(name) == 1 else f"{name}#{names[:i + 1].count(name)}"
            for i, name in enumerate(names)]
    axes = [(index, option) for index, (_, options) in enumerate(passes)
            for option in options or [] if option.axis is not None]
    if not axes:
        raise PipelineError(f"no [..] axis in sweep grid {text!r}: give an option the values to try, "
                            f"e.g. r=[4,8]; for a single pipeline use fxpress run")
    size = math.prod(len(option.axis) for _, option in axes)
    if size > max_points:
        raise PipelineError(f"sweep grid {text!r} has {size} points, more than the limit of {max_points}; "
                            f"narrow the axes or raise the limit (--max-points {size})")
    short = [option.key for _, option in axes]
    labels = [key if short.count(key) == 1 else f"{keys[index]}.{key}" for (index, _), key in zip(axes, short)]
    points = []
    for combination in itertools.product(*(option.axis for _, option in axes)):
        chosen = {id(option): value for (_, option), value in zip(axes, combination)}
        pipeline = ",".join(_pass_text(name, options, chosen) for name, options in passes)
        label = ",".join(f"{label}={value}" for label, value in zip(labels, combination))
        try:
            instances = parse_pipeline(pipeline)
        except PipelineError as err:
            raise PipelineError(f"sweep point {label}: {err}") from err
        settings = {f"{keys[index]}.{option.key}": getattr(instances[index], option.key) for index, option in axes}
        points.append(SweepPoint(settings=settings, pipeline=pipeline, label=label))
    return points


def _pass_text(name: str, options: list[_Option] | None, chosen: dict[int, str]) -> str:
    if options is None:
        return name
    return f"{name}{{{','.join(f'{o.key}={chosen.get(id(o), o.value)}' for o in options)}}}"


# -- running ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPlan:
    """What every point shares, as ``fxpress run`` takes it (picklable: worker processes receive it)."""

    model: str  # a MODEL spec: zoo name, Hugging Face folder, .gguf file or path/to/file.py:factory
    task: str | None = None
    calibration: Source = Source("default")
    calibration_batches: int = 4  # 0: none
    seed: int = 0
    eval: Source = Source("default")
    eval_items: int | None = None


@dataclass
class PointResult:
    """What one point (or the baseline: label "baseline", no settings) measured."""

    label: str
    pipeline: str
    settings: dict[str, Any]
    metrics: dict[str, float]
    macs: int
    params: int
    nodes: int
    seconds: float  # pipeline and evaluation
    latency_ms: float | None = None

    @property
    def metric(self) -> float:
        return next(iter(self.metrics.values()))


@dataclass
class SweepResult:
    """The baseline and every point, in grid order; `metric` is the task metric's name."""

    model: str
    grid: str
    metric: str
    baseline: PointResult
    points: list[PointResult]
    plan: SweepPlan
    latency_note: str = ""  # how latency was measured; "" when it was not
    # the graphs by label ("baseline" too) where this process holds them: workers=1, or after timing
    graphs: dict[str, Graph] = field(default_factory=dict, repr=False)

    @property
    def goal(self) -> str:
        """"max" or "min": which way the metric improves."""
        return METRIC_GOAL[self.metric]

    def objectives(self, cost: str = "macs") -> dict[str, str]:
        return {"metric": self.goal, cost: "min"}


def load_and_capture(plan: SweepPlan) -> tuple[ZooModel, Graph]:
    """The model and its captured graph, as ``fxpress run`` captures it."""
    model = resolve_model(plan.model, task=plan.task)
    return model, capture_model(model)


def compress(model: ZooModel, captured: Graph, pipeline: str, plan: SweepPlan, checks: bool = True) -> Graph:
    """Run `pipeline` on `captured` as a recipe of the plan's calibration and seed would (the context and
    checks of ``fxpress run``); the graph it returns."""
    recipe = Recipe(pipeline=pipeline, calibration=Calibration(source=str(plan.calibration),
                                                               batches=plan.calibration_batches), seed=plan.seed)
    return run_passes(model, captured, recipe, checks=checks).graph


def measure(model: ZooModel, captured: Graph, point: SweepPoint | None, plan: SweepPlan) -> tuple[PointResult, Graph]:
    """Run one point (None: the baseline) and score it."""
    start = time.perf_counter()
    graph = compress(model, captured, point.pipeline, plan) if point else captured
    metrics = evaluate(model, graph, plan.eval, max_items=plan.eval_items)
    result = PointResult(label=point.label if point else "baseline", pipeline=point.pipeline if point else "",
                         settings=dict(point.settings) if point else {}, metrics=metrics, macs=graph.macs,
                         params=graph.num_params, nodes=graph.num_nodes, seconds=time.perf_counter() - start)
    return result, graph


class _WorkerState:
    """The model and its captured graph inside one spawned worker process, made by its first job: the
    worker runs all its points on that capture (a pass leaves its input graph and the model usable).
    Never set in the parent process."""

    plan: SweepPlan | None = None
    model: ZooModel | None = None
    captured: Graph | None = None


def measure_in_worker(plan: SweepPlan, point: SweepPoint | None) -> PointResult:
    """A worker process's job (one torch thread): run one point, or the baseline, and score it."""
    torch.set_num_threads(1)
    if _WorkerState.plan != plan:
        _WorkerState.model, _WorkerState.captured = load_and_capture(plan)
        _WorkerState.plan = plan
    return measure(_WorkerState.model, _WorkerState.captured, point, plan)[0]


def run_sweep(plan: SweepPlan, points: Sequence[SweepPoint], *, workers: int = 1, latency: bool = True,
              progress: Progress | None = None, grid: str = "") -> SweepResult:
    """Run the baseline and every point; `workers` > 1 runs them in that many spawned processes.

    One process captures the model once and runs every point it is given on that capture.  `latency`:
    time the baseline and every point afterwards, here (see the module doc).
    """
    if workers < 1:
        raise FxpressError(f"workers must be >= 1, got {workers}")
    progress = progress or NullProgress()
    start = time.perf_counter()
    if workers == 1:
        model, captured = load_and_capture(plan)
    else:
        model = resolve_model(plan.model, task=plan.task)
    check_evaluable(model, plan.eval)
    if plan.eval.kind == "default" and not has_default_metric(model):
        raise DataError(f"{model.name} has no task metric to sweep against; pass an --eval source")
    jobs: list[SweepPoint | None] = [None, *points]
    graphs: dict[str, Graph] = {}
    if workers == 1:
        results = []
        for job in progress.track(jobs, "sweep", total=len(jobs)):
            result, graph = _run_here(model, captured, job, plan)
            results.append(result)
            graphs[result.label] = graph
    else:
        results = _run_in_workers(plan, jobs, workers, progress)
    log.info("sweep of %s: %d points and the baseline in %.1f s (%d workers)", model.name, len(points),
             time.perf_counter() - start, workers)
    sweep = SweepResult(model=model.name, grid=grid, metric=next(iter(results[0].metrics)),
                        baseline=results[0], points=results[1:], plan=plan)
    if latency:
        if workers > 1:  # the graphs stayed in the workers: make them again here, as the workers did
            graphs = _rebuild(plan, sweep, progress)
        start = time.perf_counter()
        _time_points(model, sweep, graphs)
        log.info("timed %d graphs in %.1f s", len(graphs), time.perf_counter() - start)
    sweep.graphs = graphs
    return sweep


def _rebuild(plan: SweepPlan, sweep: SweepResult, progress: Progress) -> dict[str, Graph]:
    """Every point's graph made again in this process (checked already in its worker)."""
    model, captured = load_and_capture(plan)
    graphs = {"baseline": captured}
    for point in progress.track(sweep.points, "graphs for timing", total=len(sweep.points)):
        graphs[point.label] = compress(model, captured, point.pipeline, plan, checks=False)
        if (graphs[point.label].macs, graphs[point.label].num_params) != (point.macs, point.params):
            log.warning("sweep point %s made again for timing differs from its worker's graph (MACs %d vs %d)",
                        point.label, graphs[point.label].macs, point.macs)
    return graphs


def _run_here(model: ZooModel, captured: Graph, job: SweepPoint | None, plan: SweepPlan) -> tuple[PointResult, Graph]:
    try:
        return measure(model, captured, job, plan)
    except FxpressError as err:
        raise FxpressError(f"sweep point {job.label if job else 'baseline'} failed: {first_line(err)}") from err


def _run_in_workers(plan: SweepPlan, jobs: list[SweepPoint | None], workers: int,
                    progress: Progress) -> list[PointResult]:
    context = multiprocessing.get_context("spawn")
    results: list[PointResult | None] = [None] * len(jobs)
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(measure_in_worker, plan, job): index for index, job in enumerate(jobs)}
        try:
            for future in progress.track(concurrent.futures.as_completed(futures), "sweep", total=len(jobs)):
                index = futures[future]
                try:
                    results[index] = future.result()
                except FxpressError as err:
                    label = jobs[index].label if jobs[index] else "baseline"
                    raise FxpressError(f"sweep point {label} failed: {first_line(err)}") from err
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def latency_inputs(model: ZooModel) -> tuple:
    """Batch 1 of the example inputs where dim 0 is a dynamic batch; the example inputs otherwise."""
    if model.dynamic_dims and all(model.dynamic_dims.get(i, {}).get(0) == "batch"
                                  for i in range(len(model.example_inputs))):
        return tuple(x[:1] for x in model.example_inputs)
    return tuple(model.example_inputs)


def _time_points(model: ZooModel, sweep: SweepResult, graphs: dict[str, Graph]) -> None:
    inputs = latency_inputs(model)
    timed = interleaved_latency(graphs, inputs, rounds=LATENCY_ROUNDS, budget_s=LATENCY_BUDGET_S)
    for result in [sweep.baseline, *sweep.points]:
        result.latency_ms = timed[result.label].median_ms
    batch = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
    sweep.latency_note = (f"median ms at batch {batch}, {torch.get_num_threads()} thread(s), measured in one "
                          f"process after all points, in {LATENCY_ROUNDS} interleaved rounds")


# -- choosing ------------------------------------------------------------------------------------------

def _value(point: Any, name: str) -> float:
    value = point[name] if isinstance(point, Mapping) else getattr(point, name)
    if value is None:
        raise FxpressError(f"point {getattr(point, 'label', point)!r} has no {name} to compare")
    return value


def dominates(a: Any, b: Any, objectives: Mapping[str, str]) -> bool:
    """Whether `a` is at least as good as `b` on every objective and better on one."""
    better = False
    for name, goal in objectives.items():
        x, y = (_value(a, name), _value(b, name)) if goal == "max" else (-_value(a, name), -_value(b, name))
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(points: Sequence[Any], objectives: Mapping[str, str]) -> list[Any]:
    """The points no other point dominates, sorted by the last objective (then the first).

    `objectives` maps a name (a key of a mapping point, an attribute otherwise) to "max" or "min":
    ``pareto_front(results, {"metric": "max", "macs": "min"})``.  Equal points all stay.
    """
    for name, goal in objectives.items():
        if goal not in ("max", "min"):
            raise FxpressError(f"objective {name!r}: goal must be 'max' or 'min', not {goal!r}")
    front = [p for p in points if not any(dominates(q, p, objectives) for q in points if q is not p)]
    last, first = list(objectives)[-1], list(objectives)[0]
    sign = {name: 1 if goal == "min" else -1 for name, goal in objectives.items()}
    return sorted(front, key=lambda p: (sign[last] * _value(p, last), sign[first] * _value(p, first)))


def within_tolerance(sweep: SweepResult, point: PointResult, tolerance: float | None = None) -> bool:
    """Whether `point` loses at most `tolerance` of the metric against the baseline (absolute for accuracy
    and MRR, relative for perplexity and depth RMSE; default DEFAULT_TOLERANCE)."""
    tolerance = DEFAULT_TOLERANCE[sweep.metric] if tolerance is None else tolerance
    if sweep.goal == "min":
        return point.metric <= sweep.baseline.metric * (1 + tolerance)
    return point.metric >= sweep.baseline.metric - tolerance


def best_point(sweep: SweepResult, cost: str = "macs", tolerance: float | None = None) -> PointResult | None:
    """The point of the front with the smallest `cost` whose metric is within `tolerance` of the baseline
    and whose cost is below the baseline's; None when no point is."""
    front = pareto_front(sweep.points, sweep.objectives(cost))
    return next((p for p in front if within_tolerance(sweep, p, tolerance)
                 and _value(p, cost) < _value(sweep.baseline, cost)), None)


def recipe_data(sweep: SweepResult, point: PointResult) -> dict[str, Any]:
    """The keys of a recipe (fxpress.recipes.recipe) that reproduce `point` with ``fxpress run``."""
    plan = sweep.plan
    data: dict[str, Any] = {"model": plan.model, "pipeline": point.pipeline,
                            "calibration": {"source": str(plan.calibration), "batches": plan.calibration_batches},
                            "eval": {"source": str(plan.eval)}, "seed": plan.seed}
    if plan.eval_items is not None:
        data["eval"]["items"] = plan.eval_items
    return data


__all__ = ["DEFAULT_TOLERANCE", "MAX_POINTS", "PointResult", "SweepPlan", "SweepPoint", "SweepResult",
           "best_point", "compress", "dominates", "expand_grid", "load_and_capture",
           "measure", "measure_in_worker", "pareto_front", "recipe_data", "run_sweep", "within_tolerance"]
