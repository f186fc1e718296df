"""Low-rank benchmark: low-rank{method=svd|asvd} at equal ranks on zoo models, before and after distill.

    python benchmarks/lowrank.py [--quick] [--json PATH] [--models minilm,smollm2,cnn-digits]
                                 [--max-items N] [--blocks N] [--distill-steps N]

For each model, a dense row and, per rank target, one row per method (plain truncated SVD and
activation-aware whitened SVD on the same calibration batches): the same rank everywhere gives both
methods the same parameter count, so their metrics compare directly.  ``metric``: MiniLM retrieval MRR
on stdlib-docs test pairs (``--max-items``), SmolLM2 perplexity on ``--blocks`` 64-token pydoc-topics
test blocks (its weights come from a Q4_1 GGUF), cnn-digits top-1 accuracy on the digits test split
(after fuse-batchnorm, which both the dense and factorized graphs get), gdnet-lite depth
super-resolution RMSE in mm (evaluate()'s ``rmse_mm``, lower is better; skipped with a log line when
the zoo does not have it).  ``metric_distilled``: the same
after ``distill`` with the dense graph as teacher (cnn-digits has no residual blocks: distill with
tail=0 trains only its 1-D tensors there, so little recovery is expected).  ``latency_ratio``:
factorized / dense eager median latency on one calibration batch at 1 thread.

Rows (``--json``): model, method, target, params_ratio, macs_ratio, latency_ratio, metric, metric_distilled.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fxpress
from fxpress.errors import ZooError
from fxpress.eval import calibration_batches, evaluate, measure_latency, task_loss_for
from fxpress.passes import PassContext, PassManager
from fxpress.zoo import list_models, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.table import print_rows, start_run  # noqa: E402

log = logging.getLogger("benchmarks.lowrank")

FIELDS = ("model", "method", "target", "params_ratio", "macs_ratio", "latency_ratio", "metric", "metric_distilled")
METHODS = ("svd", "asvd")


@dataclass(frozen=True)
class ModelPlan:
    """How to benchmark one zoo model: the pass options per target, calibration and distill settings."""

    name: str
    targets: tuple[str, ...]  # low-rank options, e.g. "rank=128"
    quick_targets: tuple[str, ...]
    prefix: str = ""  # passes run on both the dense and the factorized graph (fuse-batchnorm)
    calibration: int = 8
    batch_size: int | None = None
    distill: str = "lr=1e-4"  # distill options besides steps
    eval_options: dict = field(default_factory=dict)  # evaluate() keywords, full run


PLANS = {
    "minilm": ModelPlan("minilm", ("rank=96", "rank=192", "energy=0.9"), ("rank=128",), calibration=8,
                        batch_size=8, distill="lr=1e-4,tail=2"),
    "smollm2": ModelPlan("smollm2", ("rank=192", "rank=256", "energy=0.9"), ("rank=256",), calibration=8,
                         batch_size=2, distill="lr=1e-4,tail=0"),
    "cnn-digits": ModelPlan("cnn-digits", ("rank=8", "rank=16", "energy=0.9"), ("rank=16",), prefix="fuse-batchnorm",
                            calibration=4, distill="lr=1e-3,tail=0"),
    # gdnet-lite: the depth super-resolution zoo model (metric: evaluate()'s rmse_mm, lower is better); run by
    # name, and skipped with a log line where the zoo does not list it or its fixture is missing.
    "gdnet-lite": ModelPlan("gdnet-lite", ("rank=16", "energy=0.9"), ("rank=16",), calibration=4,
                            distill="lr=1e-4,tail=0"),
}
DEFAULT_MODELS = ("minilm", "smollm2", "cnn-digits", "gdnet-lite")


@dataclass
class Settings:
    quick: bool = False
    max_items: int = 400  # MiniLM query/document pairs
    blocks: int = 64  # SmolLM2 perplexity blocks
    distill_steps: int = 40
    latency_budget_s: float = 2.0
    latency_runs: int = 5  # at least this many timed calls (after 2 warm-up calls)
    models: tuple[str, ...] = DEFAULT_MODELS


QUICK = dict(quick=True, max_items=100, blocks=8, distill_steps=8, latency_budget_s=0.5, latency_runs=3)


def metric(zoo, graph: fxpress.Graph, settings: Settings) -> float:
    """The model's task metric (the first value evaluate() reports)."""
    if zoo.task == "causal-lm":
        scores = evaluate(zoo, graph, blocks=settings.blocks)
    elif zoo.task == "embedding":
        scores = evaluate(zoo, graph, max_items=settings.max_items)
    else:
        scores = evaluate(zoo, graph)
    return float(next(iter(scores.values())))


def latency_ms(graph: fxpress.Graph, inputs: tuple, settings: Settings) -> float:
    """Median eager latency of one call (ms)."""
    return measure_latency(graph, inputs, min_runs=settings.latency_runs, budget_s=settings.latency_budget_s).median_ms


def make_row(model: str, method: str, target: str, dense: fxpress.Graph, graph: fxpress.Graph, *,
             latency_ratio: float, metric_value: float, metric_distilled: float | None) -> dict:
    return {"model": model, "method": method, "target": target,
            "params_ratio": round(graph.num_params / dense.num_params, 4),
            "macs_ratio": round(graph.macs / dense.macs, 4), "latency_ratio": round(latency_ratio, 4),
            "metric": round(metric_value, 4),
            "metric_distilled": None if metric_distilled is None else round(metric_distilled, 4)}


def model_rows(plan: ModelPlan, zoo, settings: Settings) -> list[dict]:
    started = time.perf_counter()
    calibration = calibration_batches(zoo, plan.calibration, plan.batch_size)
    graph = fxpress.capture(zoo.module, calibration[0], dynamic=zoo.dynamic_dims, name=plan.name)
    ctx = PassContext(calibration=calibration, loss=task_loss_for(zoo), seed=0)
    if plan.prefix:
        graph = PassManager(plan.prefix).run(graph, ctx).graph
    ctx.teacher = graph
    inputs = calibration[0]
    dense_ms = latency_ms(graph, inputs, settings)
    dense_metric = metric(zoo, graph, settings)
    rows = [make_row(plan.name, "dense", "-", graph, graph, latency_ratio=1.0, metric_value=dense_metric,
                     metric_distilled=None)]
    log.info("%s dense: metric %.4f, %.2f ms (%.0f s)", plan.name, dense_metric, dense_ms,
             time.perf_counter() - started)
    distill = f"distill{{steps={settings.distill_steps},{plan.distill}}}"
    for target in plan.quick_targets if settings.quick else plan.targets:
        for method in METHODS:
            started = time.perf_counter()
            result = PassManager(f"low-rank{{{target},method={method}}}").run(graph, ctx)
            factorized, stats = result.graph, result.reports[-1].stats
            if not result.reports[-1].modified:
                log.info("%s %s %s: nothing factorized (%s)", plan.name, method, target, stats.get("reason"))
                continue
            latency = latency_ms(factorized, inputs, settings) / dense_ms
            value = metric(zoo, factorized, settings)
            distilled = PassManager(distill).run(factorized, ctx).graph if settings.distill_steps else None
            recovered = None if distilled is None else metric(zoo, distilled, settings)
            rows.append(make_row(plan.name, method, target, graph, factorized, latency_ratio=latency,
                                 metric_value=value, metric_distilled=recovered))
            log.info("%s %s %s: %d layers, params x%.3f, metric %.4f -> %s distilled (%.0f s)", plan.name, method,
                     target, len(stats["factorized"]), rows[-1]["params_ratio"], value, recovered,
                     time.perf_counter() - started)
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict]) -> None:
    print_rows(rows, FIELDS, _fmt)
    print("metric: minilm = stdlib-docs test MRR, smollm2 = pydoc-topics perplexity (lower is better), "
          "cnn-digits = digits test accuracy, gdnet-lite = depth RMSE in mm (lower is better); "
          "ratios are factorized / dense")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one rank per model, fewer items, 8 distill steps")
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--max-items", type=int, help="stdlib-docs test pairs for MiniLM (default 400, --quick 100)")
    parser.add_argument("--blocks", type=int, help="pydoc blocks for SmolLM2 perplexity (default 64, --quick 8)")
    parser.add_argument("--distill-steps", type=int, help="distill steps per row (default 40, --quick 8; 0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    start_run(log, args.threads)
    settings = Settings(**QUICK) if args.quick else Settings()
    settings.models = tuple(args.models.split(","))
    for name, value in (("max_items", args.max_items), ("blocks", args.blocks), ("distill_steps", args.distill_steps)):
        if value is not None:
            setattr(settings, name, value)
    start, rows, available = time.perf_counter(), [], set(list_models())
    for name in settings.models:
        if name not in PLANS:
            parser.error(f"unknown model {name!r}; known: {', '.join(PLANS)}")
        if name not in available:
            log.info("skipping %s: the zoo has no such model yet", name)
            continue
        try:
            zoo = load_model(name)
        except ZooError as err:  # listed, but its weights are not there yet
            log.info("skipping %s: %s", name, err)
            continue
        rows += model_rows(PLANS[name], zoo, settings)
    if rows:
        print_table(rows)
    print(f"total time {time.perf_counter() - start:.0f} s ({'quick' if args.quick else 'full'}, "
          f"{args.threads} thread(s))")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
