"""`fxpress sweep MODEL --pipeline GRID`: run every point of a grid, show the Pareto front, keep the best.

The terminal gets a table of the baseline and every point; ``--report`` writes an HTML page with the
Pareto plots (also saved beside it as SVG and PNG) and the table; the best recipe is written as YAML
(see :func:`fxpress.recipes.sweep.best_point` for the rule).  Beside the report, ``<stem>.json`` holds
every number of the sweep.
"""
from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.markup import escape
from rich.table import Table

from fxpress.cli.commands import calibration_plan
from fxpress.cli.render import RichProgress, console, human
from fxpress.errors import FxpressError
from fxpress.eval import parse_source
from fxpress.recipes.recipe import Recipe
from fxpress.recipes.sweep import (DEFAULT_TOLERANCE, PointResult, SweepPlan, SweepResult, best_point,
                                   expand_grid, pareto_front, recipe_data, run_sweep)
from fxpress.report import Report
from fxpress.report.page import pre_html

COSTS = {"macs": "macs", "params": "params", "latency": "latency_ms"}  # --objective -> PointResult field
COST_LABELS = {"macs": "MACs", "params": "parameters", "latency_ms": "latency (ms)"}
FRONT, OTHER, BEST = "#fc8d62", "#8da0cb", "#1e7a3c"


def cmd_sweep(args) -> int:
    """Expand and check the grid, run it, then print, plot, report and write the best recipe."""
    if args.workers < 1:
        raise FxpressError(f"--workers must be >= 1, got {args.workers}")
    if args.tolerance is not None and args.tolerance < 0:
        raise FxpressError(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.objective == "latency" and args.no_latency:
        raise FxpressError("--objective latency needs the timings: drop --no-latency")
    points = expand_grid(args.pipeline, max_points=args.max_points)  # every point parses before anything runs
    calibration, batches = calibration_plan(args)
    plan = SweepPlan(model=args.model, task=getattr(args, "task", None), calibration=calibration,
                     calibration_batches=batches, seed=args.seed, eval=parse_source(args.eval),
                     eval_items=args.eval_items)
    if not args.threads:  # one thread, as the workers use: timings on a busy machine stay comparable
        torch.set_num_threads(1)
    console.print(f"sweep of {args.model}: {len(points)} points of {args.pipeline} and the baseline, "
                  f"{args.workers} worker(s)", markup=False)
    sweep = run_sweep(plan, points, workers=args.workers, latency=not args.no_latency, progress=RichProgress(),
                      grid=args.pipeline)
    cost = COSTS[args.objective]
    front = pareto_front(sweep.points, sweep.objectives(cost))
    best = best_point(sweep, cost, args.tolerance)
    console.print(sweep_table(sweep, front, best, cost))
    if sweep.latency_note:
        console.print(f"latency: {sweep.latency_note}", markup=False)
    recipe_path = Path(args.recipe_out or (Path(args.report).with_suffix(".best.yaml") if args.report
                                           else "sweep-best.yaml"))
    rule = best_rule(sweep, cost, args.tolerance)
    recipe_text = write_best_recipe(sweep, best, recipe_path, rule) if best else None
    if best:
        console.print(f"best: {best.label} ({rule}); recipe written to {recipe_path}", markup=False)
    else:
        console.print(f"no point meets the rule ({rule}); no recipe written", markup=False)
    if args.report:
        written = write_report(sweep, front, best, cost, Path(args.report), recipe_text, rule)
        console.print("wrote " + ", ".join(str(path) for path in written), markup=False)
    return 0


def best_rule(sweep: SweepResult, cost: str, tolerance: float | None) -> str:
    tolerance = DEFAULT_TOLERANCE[sweep.metric] if tolerance is None else tolerance
    allowed = f"{tolerance:.0%} above" if sweep.goal == "min" else f"{tolerance:g} below"
    return (f"the point of the front with the least {COST_LABELS[cost]}, below the baseline's, whose "
            f"{sweep.metric} is at most {allowed} the baseline's {sweep.baseline.metric:.4g}")


def _row_values(sweep: SweepResult, point: PointResult) -> list[Any]:
    change = point.metric - sweep.baseline.metric
    return [point.label, point.pipeline or "(captured graph)", point.metric, change, point.macs,
            point.macs / sweep.baseline.macs if sweep.baseline.macs else None, point.params,
            point.latency_ms, point.seconds]


HEADERS = ["point", "pipeline", "metric", "vs baseline", "MACs", "MACs ratio", "params", "latency ms", "run s"]


def sweep_table(sweep: SweepResult, front: list[PointResult], best: PointResult | None, cost: str) -> Table:
    """The baseline and every point; the front marked with *, the best recipe with 'best'."""
    title = f"{sweep.model}: sweep of {sweep.grid} ({sweep.metric}; front by {COST_LABELS[cost]})"
    table = Table(title=escape(title))
    for column in ["", *HEADERS]:
        justify = "left" if column in ("", "point", "pipeline") else "right"
        table.add_column(column.replace("metric", sweep.metric), justify=justify)
    for point in [sweep.baseline, *sweep.points]:
        mark = "best" if point is best else "*" if any(point is p for p in front) else ""
        label, pipeline, metric, change, macs, ratio, params, latency, seconds = _row_values(sweep, point)
        table.add_row(mark, escape(label), escape(pipeline), f"{metric:.4f}",
                      "-" if point is sweep.baseline else f"{change:+.4f}", human(macs),
                      "-" if ratio is None else f"{ratio:.3f}", human(params),
                      "-" if latency is None else f"{latency:.3f}", f"{seconds:.1f}")
    return table


def pareto_figure(sweep: SweepResult, cost: str, front: list[PointResult], best: PointResult | None):
    """Metric against `cost`: every point labelled with its settings, the front connected, the baseline a star."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.4), layout="constrained")
    axes = figure.add_subplot()
    scale = 1e6 if cost == "macs" else 1e3 if cost == "params" else 1.0
    unit = {"macs": "MACs (millions)", "params": "parameters (thousands)"}.get(cost, "latency ms (batch 1)")
    x = [getattr(p, cost) / scale for p in sweep.points]
    axes.scatter(x, [p.metric for p in sweep.points], color=OTHER, label="points", zorder=2)
    axes.plot([getattr(p, cost) / scale for p in front], [p.metric for p in front], "-o", color=FRONT,
              label="Pareto front", zorder=3)
    axes.scatter([getattr(sweep.baseline, cost) / scale], [sweep.baseline.metric], marker="*", s=160,
                 color="black", label="baseline", zorder=4)
    if best is not None:
        axes.scatter([getattr(best, cost) / scale], [best.metric], s=220, facecolors="none", edgecolors=BEST,
                     linewidths=2, label="best recipe", zorder=5)
    for point, xpos in zip(sweep.points, x):
        axes.annotate(point.label, (xpos, point.metric), textcoords="offset points", xytext=(5, 4), fontsize=7)
    better = "higher" if sweep.goal == "max" else "lower"
    axes.set_xlabel(unit)
    axes.set_ylabel(f"{sweep.metric} ({better} is better)")
    axes.set_title(f"{sweep.model}: {sweep.metric} against {COST_LABELS[cost]}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def write_best_recipe(sweep: SweepResult, best: PointResult, path: Path, rule: str) -> str:
    """The best point as a recipe YAML (checked against the recipe schema); returns the text written."""
    data = recipe_data(sweep, best)
    Recipe.from_dict(data, where=str(path))
    header = (f"# best point of: fxpress sweep {sweep.model} --pipeline \"{sweep.grid}\"\n"
              f"# {best.label}: {sweep.metric} {best.metric:.4f} (baseline {sweep.baseline.metric:.4f}), "
              f"MACs {best.macs:,} (baseline {sweep.baseline.macs:,})\n# rule: {rule}\n")
    text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


def write_report(sweep: SweepResult, front: list[PointResult], best: PointResult | None, cost: str,
                 path: Path, recipe_text: str | None, rule: str) -> list[Path]:
    """The HTML page, <stem>.json with every number, and each Pareto plot as <stem>.pareto-<cost>.svg (and
    .png for the plot of the chosen cost)."""
    report = Report(f"{sweep.model}: sweep of {sweep.grid}",
                    subtitle=f"{len(sweep.points)} points and the baseline; {sweep.metric} on "
                             f"{sweep.plan.eval} ({sweep.plan.eval_items or 'all'} items)")
    written = []
    costs = [cost] + [c for c in ("macs", "latency_ms") if c != cost]
    for name in costs:
        if name == "latency_ms" and sweep.baseline.latency_ms is None:
            continue
        points_front = front if name == cost else pareto_front(sweep.points, sweep.objectives(name))
        figure = pareto_figure(sweep, name, points_front, best if name == cost else None)
        for suffix in (".svg", ".png") if name == cost else (".svg",):  # a PNG of the main plot only
            plot = path.with_name(f"{path.stem}.pareto-{name.removesuffix('_ms')}{suffix}")
            figure.savefig(plot)  # constrained layout: one render, no "tight" second pass
            written.append(plot)
        report.add_figure(f"{sweep.metric} against {COST_LABELS[name]}", figure,
                          caption="front: the points no other point beats on both axes")
    rows = []
    for point in [sweep.baseline, *sweep.points]:
        status = "best" if point is best else "front" if any(point is p for p in front) else ""
        rows.append([status, *_row_values(sweep, point)])
    note = f"best recipe: {rule}. " + (f"Latency: {sweep.latency_note}." if sweep.latency_note else "")
    report.add_table("points", ["", *[h.replace("metric", sweep.metric) for h in HEADERS]], rows, note=note)
    body = pre_html(recipe_text.splitlines()) if recipe_text else \
        f"<p>{html.escape('no point meets the rule: ' + rule)}</p>"
    report.add_html("best recipe", body)
    numbers = path.with_suffix(".json")
    numbers.write_text(json.dumps(sweep_json(sweep, front, best), indent=1) + "\n", encoding="utf-8")
    return [report.write(path), numbers, *written]


def sweep_json(sweep: SweepResult, front: list[PointResult], best: PointResult | None) -> dict[str, Any]:
    """Every number of the sweep, for scripts: the baseline, the points, the front and the best point."""
    return {"model": sweep.model, "grid": sweep.grid, "metric": sweep.metric, "goal": sweep.goal,
            "latency": sweep.latency_note, "baseline": dataclasses.asdict(sweep.baseline),
            "points": [dataclasses.asdict(point) for point in sweep.points],
            "front": [point.label for point in front], "best": best.label if best else None}
