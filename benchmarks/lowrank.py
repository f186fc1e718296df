"""Low-rank benchmark: low-rank{method=svd|asvd} at equal ranks on zoo models, before and after distill.

    python benchmarks/lowrank.py [--quick] [--json PATH] [--models minilm,smollm2,cnn-digits,gdnet-lite]
                                 [--max-items N] [--blocks N] [--distill-steps N] [--no-llvm]

For each model, a dense row and, per rank target, one row per method (plain truncated SVD and
activation-aware whitened SVD on the same calibration batches): the same rank everywhere gives both
methods the same parameter count, so their metrics compare directly.  ``metric``: MiniLM retrieval MRR
on stdlib-docs test pairs (``--max-items``), SmolLM2 perplexity on ``--blocks`` 64-token pydoc-topics
test blocks (its weights come from a Q4_1 GGUF), cnn-digits top-1 accuracy on the digits test split
(after fuse-batchnorm, which both the dense and factorized graphs get), gdnet-lite depth
super-resolution RMSE in mm (evaluate()'s ``rmse_mm``, lower is better; skipped with a log line when
the zoo does not have it).  ``metric_distilled``: the same
after ``distill`` with the dense graph as teacher (cnn-digits has no residual blocks: distill with
tail=0 trains only its 1-D tensors there, so little recovery is expected).

Latency, where compute rather than per-op overhead decides, at ``--threads`` (default 1) on the
model's latency batch (``ModelPlan.latency_batch``: cnn-digits 256 images; the others their calibration
batch: MiniLM 8 query/document pairs, SmolLM2 2 x 64 tokens, gdnet-lite 8 tiles), eager and compiled
with ``fxpress.backends.compile(graph, "llvm")`` at that batch.  Per target, dense and both methods'
graphs run in interleaved rounds (``interleaved_latency``, 5 rounds): ``latency_ratio`` (eager) and
``latency_ratio_llvm`` are the median over rounds of factorized / dense in the same round, so load
that drifts between rounds cancels; ``min_ratio`` / ``min_ratio_llvm`` divide the fastest calls (on a
shared machine load only adds time, so these move least from run to run).  ``meets``: which of
eager / llvm satisfy issue 16's criterion on the median ratio, the latency cut at least 0.8 x the MAC
cut, (1 - latency_ratio) >= 0.8 (1 - macs_ratio).  ``--no-llvm`` (or ``ModelPlan.llvm``) compiles nothing.

Rows (``--json``): model, method, target, params_ratio, macs_ratio, latency_ratio, latency_ratio_llvm,
metric, metric_distilled, and min_ratio, min_ratio_llvm, latency_ms, latency_llvm_ms (medians),
latency_batch, meets_eager, meets_llvm.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import fxpress
from fxpress import backends
from fxpress.errors import LoweringError, ZooError
from fxpress.eval import calibration_batches, evaluate, task_loss_for
from fxpress.passes import PassContext, PassManager
from fxpress.utils.timing import interleaved_latency
from fxpress.zoo import list_models, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.table import print_rows, start_run  # noqa: E402

log = logging.getLogger("benchmarks.lowrank")

FIELDS = ("model", "method", "target", "params_ratio", "macs_ratio", "latency_ratio", "latency_ratio_llvm",
          "min_ratio", "min_ratio_llvm", "metric", "metric_distilled", "meets")
METHODS = ("svd", "asvd")
CUT_SHARE = 0.8  # issue 16: the latency cut is at least this share of the MAC cut


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
    latency_batch: int | None = None  # examples per timed call (None: the calibration batch)
    llvm: bool = True  # also time the graphs compiled for llvm


PLANS = {
    "minilm": ModelPlan("minilm", ("rank=96", "rank=192", "energy=0.9"), ("rank=128",), calibration=8,
                        batch_size=8, distill="lr=1e-4,tail=2"),
    "smollm2": ModelPlan("smollm2", ("rank=192", "rank=256", "energy=0.9"), ("rank=256",), calibration=8,
                         batch_size=2, distill="lr=1e-4,tail=0"),
    # 8 x 8 digit images: at the calibration batch (32) per-op overhead decides eager latency, so time 256
    "cnn-digits": ModelPlan("cnn-digits", ("rank=8", "rank=16", "energy=0.9", "energy=0.9,align=8"),
                            ("rank=16", "energy=0.9,align=8"), prefix="fuse-batchnorm", calibration=4,
                            distill="lr=1e-3,tail=0", latency_batch=256),
    # gdnet-lite: the depth super-resolution zoo model (metric: evaluate()'s rmse_mm, lower is better); run by
    # name, and skipped with a log line where the zoo does not list it or its fixture is missing.  Batch
    # norms folded first, as its recipe does (docs/recipes/gdnet-lite-lowrank.yaml).
    "gdnet-lite": ModelPlan("gdnet-lite", ("rank=8", "rank=16", "energy=0.94", "energy=0.94,align=8"),
                            ("rank=8", "energy=0.94", "energy=0.94,align=8"), prefix="fuse-batchnorm", calibration=4,
                            distill="lr=1e-4,tail=0"),
}
DEFAULT_MODELS = ("minilm", "smollm2", "cnn-digits", "gdnet-lite")


@dataclass
class Settings:
    quick: bool = False
    max_items: int = 400  # MiniLM query/document pairs
    blocks: int = 64  # SmolLM2 perplexity blocks
    distill_steps: int = 40
    latency_rounds: int = 5  # interleaved rounds of dense and factorized calls
    latency_budget_s: float = 0.5  # per graph and round (at least 3 timed calls)
    llvm: bool = True
    models: tuple[str, ...] = DEFAULT_MODELS


QUICK = dict(quick=True, max_items=100, blocks=8, distill_steps=8, latency_budget_s=0.3)


def metric(zoo, graph: fxpress.Graph, settings: Settings) -> float:
    """The model's task metric (the first value evaluate() reports)."""
    if zoo.task == "causal-lm":
        scores = evaluate(zoo, graph, blocks=settings.blocks)
    elif zoo.task == "embedding":
        scores = evaluate(zoo, graph, max_items=settings.max_items)
    else:
        scores = evaluate(zoo, graph)
    return float(next(iter(scores.values())))


def at_batch(graph: fxpress.Graph, batch: int | None) -> fxpress.Graph:
    """A copy of `graph` whose example inputs repeat its own to `batch` rows (None: `graph` itself)."""
    if batch is None:
        return graph
    timed = graph.copy()
    timed.example_inputs = tuple(x.repeat(-(-batch // x.shape[0]), *[1] * (x.dim() - 1))[:batch]
                                 for x in graph.example_inputs)
    return timed.annotate()


def compile_llvm(graph: fxpress.Graph) -> backends.CompiledModel | None:
    """`graph` built for llvm at its example shapes, on torch's thread count (None where it does not lower)."""
    try:
        compiled = backends.compile(graph, "llvm")
    except LoweringError as err:
        log.info("%s: no llvm build (%s)", graph.name, str(err)[:200])
        return None
    compiled.set_threads(torch.get_num_threads())
    return compiled


@dataclass(frozen=True)
class Timing:
    """One graph's latency beside dense's, over interleaved rounds: its median ms, the median of its
    per-round ratio to dense (both timed back to back), and the ratio of the fastest calls."""

    ms: float
    ratio: float
    min_ratio: float


DENSE = Timing(ms=float("nan"), ratio=1.0, min_ratio=1.0)


def paired_latency(fns: dict[str, Any], inputs: tuple, settings: Settings) -> dict[str, Timing]:
    """name -> Timing for callables timed one round after another; fns["dense"] is the reference."""
    rounds = [interleaved_latency(fns, inputs, rounds=1, budget_s=settings.latency_budget_s)
              for _ in range(settings.latency_rounds)]
    fastest_dense = min(r["dense"].min_ms for r in rounds)
    return {name: Timing(ms=statistics.median(r[name].median_ms for r in rounds),
                         ratio=statistics.median(r[name].median_ms / r["dense"].median_ms for r in rounds),
                         min_ratio=min(r[name].min_ms for r in rounds) / fastest_dense) for name in fns}


def side_by_side(timed: dict[str, fxpress.Graph], compiled: dict[str, backends.CompiledModel | None],
                 settings: Settings) -> dict[str, tuple[Timing, Timing | None]]:
    """name -> (eager Timing, llvm Timing or None): each backend's graphs timed in the same rounds."""
    inputs = timed["dense"].example_inputs
    eager = paired_latency(dict(timed), inputs, settings)
    built = {name: fn for name, fn in compiled.items() if fn is not None}
    llvm = paired_latency(built, inputs, settings) if "dense" in built and len(built) > 1 else {}
    return {name: (eager[name], llvm.get(name)) for name in timed}


def meets(latency_ratio: float | None, macs_ratio: float) -> bool | None:
    """Issue 16's criterion: (1 - latency_ratio) >= 0.8 (1 - macs_ratio)."""
    return None if latency_ratio is None else 1.0 - latency_ratio >= CUT_SHARE * (1.0 - macs_ratio)


def make_row(model: str, method: str, target: str, dense: fxpress.Graph, graph: fxpress.Graph, *,
             latency: tuple[Timing, Timing | None], batch: int | None, metric_value: float,
             metric_distilled: float | None) -> dict:
    macs_ratio = round(graph.macs / dense.macs, 4)
    eager, llvm = latency
    row = {"model": model, "method": method, "target": target,
           "params_ratio": round(graph.num_params / dense.num_params, 4), "macs_ratio": macs_ratio,
           "latency_ratio": round(eager.ratio, 4), "latency_ratio_llvm": None if llvm is None else round(llvm.ratio, 4),
           "metric": round(metric_value, 4),
           "metric_distilled": None if metric_distilled is None else round(metric_distilled, 4),
           "min_ratio": round(eager.min_ratio, 4), "min_ratio_llvm": None if llvm is None else round(llvm.min_ratio, 4),
           "latency_ms": round(eager.ms, 3), "latency_llvm_ms": None if llvm is None else round(llvm.ms, 3),
           "latency_batch": batch}
    eager, llvm = row["latency_ratio"], row["latency_ratio_llvm"]
    if method != "dense":
        row["meets_eager"], row["meets_llvm"] = meets(eager, macs_ratio), meets(llvm, macs_ratio)
    row["meets"] = "-" if method == "dense" else \
        "+".join(name for name in ("eager", "llvm") if row[f"meets_{name}"]) or "no"
    return row


def factorize(plan: ModelPlan, target: str, graph: fxpress.Graph, ctx: PassContext) -> dict[str, tuple]:
    """method -> (factorized graph, pass stats), for the methods that factorized anything."""
    done = {}
    for method in METHODS:
        report = PassManager(f"low-rank{{{target},method={method}}}").run(graph, ctx)
        stats = report.reports[-1].stats
        if report.reports[-1].modified:
            done[method] = (report.graph, stats)
        else:
            log.info("%s %s %s: nothing factorized (%s)", plan.name, method, target, stats.get("reason"))
    return done


def model_rows(plan: ModelPlan, zoo, settings: Settings) -> list[dict]:
    started = time.perf_counter()
    calibration = calibration_batches(zoo, plan.calibration, plan.batch_size)
    graph = fxpress.capture(zoo.module, calibration[0], dynamic=zoo.dynamic_dims, name=plan.name)
    ctx = PassContext(calibration=calibration, loss=task_loss_for(zoo), seed=0)
    if plan.prefix:
        graph = PassManager(plan.prefix).run(graph, ctx).graph
    ctx.teacher = graph
    dense_timed = at_batch(graph, plan.latency_batch)
    dense_llvm = compile_llvm(dense_timed) if plan.llvm and settings.llvm else None
    dense_metric = metric(zoo, graph, settings)
    log.info("%s dense: metric %.4f (%.0f s)", plan.name, dense_metric, time.perf_counter() - started)
    rows, dense_times = [], []
    distill = f"distill{{steps={settings.distill_steps},{plan.distill}}}"
    for target in plan.quick_targets if settings.quick else plan.targets:
        started = time.perf_counter()
        done = factorize(plan, target, graph, ctx)
        if not done:
            continue
        timed, compiled = {"dense": dense_timed}, {"dense": dense_llvm}
        for method, (factorized, _) in done.items():
            timed[method] = at_batch(factorized, plan.latency_batch)
            compiled[method] = compile_llvm(timed[method]) if dense_llvm is not None else None
        latency = side_by_side(timed, compiled, settings)
        dense_times.append(latency["dense"])
        for method, (factorized, stats) in done.items():
            value = metric(zoo, factorized, settings)
            distilled = PassManager(distill).run(factorized, ctx).graph if settings.distill_steps else None
            recovered = None if distilled is None else metric(zoo, distilled, settings)
            rows.append(make_row(plan.name, method, target, graph, factorized, latency=latency[method],
                                 batch=plan.latency_batch, metric_value=value, metric_distilled=recovered))
            log.info("%s %s %s: %d layers, params x%.3f, MACs x%.3f, latency x%.3f (llvm x%s), metric %.4f -> %s "
                     "distilled", plan.name, method, target, len(stats["factorized"]), rows[-1]["params_ratio"],
                     rows[-1]["macs_ratio"], rows[-1]["latency_ratio"], rows[-1]["latency_ratio_llvm"], value,
                     recovered)
        log.info("%s %s: %.0f s", plan.name, target, time.perf_counter() - started)
    llvm_ms = [llvm.ms for _, llvm in dense_times if llvm is not None]
    dense_latency = (replace(DENSE, ms=statistics.median(eager.ms for eager, _ in dense_times) if dense_times else
                             float("nan")),  # over every target's rounds
                     replace(DENSE, ms=statistics.median(llvm_ms)) if llvm_ms else None)
    dense_row = make_row(plan.name, "dense", "-", graph, graph, latency=dense_latency, batch=plan.latency_batch,
                         metric_value=dense_metric, metric_distilled=None)
    return [dense_row] + rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict]) -> None:
    print_rows(rows, FIELDS, _fmt)
    print("metric: minilm = stdlib-docs test MRR, smollm2 = pydoc-topics perplexity (lower is better), "
          "cnn-digits = digits test accuracy, gdnet-lite = depth RMSE in mm (lower is better); "
          "ratios are factorized / dense; latency at each model's latency batch (cnn-digits 256 images), "
          f"eager and llvm; meets: (1 - latency_ratio) >= {CUT_SHARE} (1 - macs_ratio)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one or two targets per model, fewer items, "
                        "8 distill steps")
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--max-items", type=int, help="stdlib-docs test pairs for MiniLM (default 400, --quick 100)")
    parser.add_argument("--blocks", type=int, help="pydoc blocks for SmolLM2 perplexity (default 64, --quick 8)")
    parser.add_argument("--distill-steps", type=int, help="distill steps per row (default 40, --quick 8; 0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and llvm threads)")
    parser.add_argument("--no-llvm", action="store_true", help="eager latency only: compile nothing")
    args = parser.parse_args(argv)
    start_run(log, args.threads)
    settings = Settings(**QUICK) if args.quick else Settings()
    settings.llvm = not args.no_llvm
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
