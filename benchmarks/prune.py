"""Pruning benchmark: oBERT sparsity on MiniLM, width pruning on SmolLM2, each against its baselines, in one run.

    python benchmarks/prune.py [--quick] [--json PATH] [--plot PATH] [--models minilm,smollm2]
                               [--max-items N] [--blocks N] [--distill-steps N]

MiniLM (stdlib-docs test MRR over ``--max-items`` query/document pairs):
prune-obs at 50/70/80/90% sparsity (--quick: 70/80) by oBERT (unstructured
``block=1`` and ``block=4x1``), magnitude (both forms) and diagonal Fisher
(--quick: no Fisher), all on the contrastive task loss and the same
calibration batches; ``metric_ci`` is the paired-bootstrap 95% interval of
MRR(row) - MRR(unstructured magnitude) at the same sparsity (the check lines
also compare obs-4x1 with magnitude-4x1).  Width rows: prune-width{mlp=768} by activation, taylor
and magnitude (equal params; interval against magnitude).  One latency row:
90% 4x1 oBERT blocks through sparse-kernels, sparse/dense thread CPU time on
the native compiled path (benchmarks/sparse_speed.measure), bytes of the
stored weights.

SmolLM2-135M (perplexity on ``--blocks`` 64-token pydoc-topics test blocks):
prune-width to mlp=1024, heads=6 and both (--quick: both) by activation
(Minitron), contribution (each unit's output through the layer that reads
it) and random, Torch-Pruning's group magnitude and group Taylor (benchmarks/peers,
the same calibration batches), and remove-layers{metric=angular} with the
block count that matches the params; each before and after the same distill
budget (teacher = the dense graph).  ``metric_ci`` is the paired-bootstrap
95% interval over blocks of the mean per-token NLL difference (nats, row
minus contribution at the same target).  ``latency_ratio``: pruned/dense eager
prefill, thread CPU time at 1 thread, interleaved rounds (one timing per
architecture).  The contribution row of the last target is exported with
fxpress.export.hf and reloaded; its logits are compared with the graph's.

Rows (``--json``): model, method, target, params_ratio (stored params),
nnz_ratio (non-zero params), bytes_ratio (stored parameter bytes), macs_ratio
(graph.macs: dense execution, so 1.0 for masked weights), latency_ratio,
metric, metric_ci ([low, high] of the difference), metric_distilled.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fxpress
from fxpress.eval import calibration_batches, docs_reciprocal_ranks, paired_bootstrap, task_loss_for
from fxpress.eval.evaluate import _lm_blocks
from fxpress.export.hf import export_hf, find_hf_model, load_hf
from fxpress.passes import PassContext, PassManager
from fxpress.zoo import load_model
from fxpress.zoo.hf import CausalLMLogits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peers.torch_pruning_baseline import prune_smollm2_with_torch_pruning  # noqa: E402
from benchmarks.sparse_speed import measure  # noqa: E402
from benchmarks.table import print_rows  # noqa: E402

log = logging.getLogger("benchmarks.prune")

FIELDS = ("model", "method", "target", "params_ratio", "nnz_ratio", "bytes_ratio", "macs_ratio", "latency_ratio",
          "metric", "metric_ci", "metric_distilled")
OBS_METHODS = {  # method -> prune-obs options besides sparsity
    "obs": "block=1,score=obs",
    "obs-4x1": "block=4x1,score=obs",
    "magnitude": "block=1,score=magnitude",
    "magnitude-4x1": "block=4x1,score=magnitude",
    "fisher-diag": "block=1,score=fisher-diag",
}
SMOL_TARGETS = {"mlp=1024": "mlp=1024", "heads=6": "heads=6", "mlp=1024,heads=6": "mlp=1024,heads=6"}
SMOL_METHODS = ("activation", "contribution", "random", "tp-magnitude", "tp-taylor", "remove-layers")
REFERENCE = "contribution"  # the activation-based criterion the SmolLM2 intervals are taken against


@dataclass
class Settings:
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
    obs_methods: tuple[str, ...] = ("obs", "obs-4x1", "magnitude", "magnitude-4x1", "fisher-diag")
    width_importances: tuple[str, ...] = ("activation", "taylor", "magnitude")
    max_items: int = 400
    encoder_batches: int = 16  # calibration batches (8 pairs) = gradients for prune-obs
    smol_targets: tuple[str, ...] = tuple(SMOL_TARGETS)
    lm_batches: int = 8  # calibration batches of 2 Shakespeare blocks
    eval_blocks: int = 64
    distill_steps: int = 40
    rounds: int = 5
    models: tuple[str, ...] = ("minilm", "smollm2")
    notes: list[str] = field(default_factory=list)  # acceptance / check lines printed after the table
    ranks: dict = field(default_factory=dict)  # (method, target) -> MiniLM per-query reciprocal ranks


QUICK = dict(sparsities=(0.7, 0.8), obs_methods=("obs", "obs-4x1", "magnitude", "magnitude-4x1"), max_items=200,
             encoder_batches=8,
             smol_targets=("mlp=1024,heads=6",), lm_batches=4, eval_blocks=16, distill_steps=8, rounds=3)


# -- shared measurements --------------------------------------------------------------------------------

def nonzero_params(graph: fxpress.Graph) -> int:
    return sum(int(torch.count_nonzero(t)) for t in graph.owned_tensors().values() if t.is_floating_point())


def all_params(graph: fxpress.Graph) -> int:
    return sum(t.numel() for t in graph.owned_tensors().values() if t.is_floating_point())


def make_row(model: str, method: str, target: str, dense: fxpress.Graph, graph: fxpress.Graph, *,
             latency_ratio: float | None, metric: float, metric_ci: list[float] | None = None,
             metric_distilled: float | None = None, bytes_ratio: float | None = None) -> dict:
    return {"model": model, "method": method, "target": target,
            "params_ratio": round(graph.num_params / dense.num_params, 4),
            "nnz_ratio": round(nonzero_params(graph) / all_params(dense), 4),
            "bytes_ratio": round(bytes_ratio if bytes_ratio is not None else graph.param_bytes / dense.param_bytes, 4),
            "macs_ratio": round(graph.macs / dense.macs, 4),
            "latency_ratio": None if latency_ratio is None else round(latency_ratio, 4),
            "metric": round(metric, 4), "metric_ci": metric_ci,
            "metric_distilled": None if metric_distilled is None else round(metric_distilled, 4)}


def eager_latency_ratio(dense: fxpress.Graph, pruned: fxpress.Graph, inputs: tuple, rounds: int) -> float:
    """pruned/dense eager time: thread CPU time at 1 thread, median of interleaved rounds (sparse_speed.measure)."""
    timed = measure(dense, pruned, inputs, rounds=rounds, paths=("eager",), calls=3)["eager"]
    return timed["sparse_ms"] / timed["dense_ms"]


def interval(a, b) -> tuple[float, list[float]]:
    """(mean(a) - mean(b), [low, high]) by paired bootstrap."""
    diff, low, high = paired_bootstrap(a, b)
    return float(diff), [round(float(low), 4), round(float(high), 4)]


# -- MiniLM: sparsity and width ---------------------------------------------------------------------------

def minilm_rows(settings: Settings) -> list[dict]:
    zoo = load_model("minilm")
    calibration = calibration_batches(zoo, settings.encoder_batches, 8)
    graph = fxpress.capture(zoo.module, calibration[0], dynamic=zoo.dynamic_dims, name="minilm")
    ctx = PassContext(calibration=calibration, loss=task_loss_for(zoo), seed=0)
    ranks = lambda g: docs_reciprocal_ranks(g, zoo.tokenizer, "test", max_items=settings.max_items)  # noqa: E731
    dense_ranks = ranks(graph)
    rows = [make_row("minilm", "dense", "-", graph, graph, latency_ratio=1.0, metric=float(dense_ranks.mean()))]
    log.info("minilm dense: MRR %.4f over %d queries", rows[0]["metric"], len(dense_ranks))
    grads = len(calibration)
    for sparsity in settings.sparsities:
        scored = {}
        for method in settings.obs_methods:
            started = time.perf_counter()
            pipeline = f"prune-obs{{sparsity={sparsity},{OBS_METHODS[method]},num_grads={grads}}}"
            pruned = PassManager(pipeline).run(graph, ctx).graph
            scored[method] = (pruned, ranks(pruned))
            log.info("minilm %s sparsity %.2f: MRR %.4f (%.0f s)", method, sparsity, float(scored[method][1].mean()),
                     time.perf_counter() - started)
        reference = scored["magnitude"][1]
        for method, (pruned, method_ranks) in scored.items():
            settings.ranks[method, f"sparsity={sparsity}"] = method_ranks
            ci = None if method == "magnitude" else interval(method_ranks, reference)[1]
            rows.append(make_row("minilm", method, f"sparsity={sparsity}", graph, pruned, latency_ratio=None,
                                 metric=float(method_ranks.mean()), metric_ci=ci))
    rows += minilm_width_rows(settings, graph, ctx, ranks)
    rows.append(minilm_latency_row(settings, graph, ctx, ranks, grads))
    return rows


def minilm_width_rows(settings: Settings, graph: fxpress.Graph, ctx: PassContext, ranks) -> list[dict]:
    scored, latency = {}, None
    for importance in settings.width_importances:
        pruned = PassManager(f"prune-width{{mlp=768,importance={importance}}}").run(graph, ctx).graph
        scored[importance] = (pruned, ranks(pruned))
        log.info("minilm width mlp=768 %s: MRR %.4f", importance, float(scored[importance][1].mean()))
    inputs = ctx.calibration[0]
    latency = eager_latency_ratio(graph, next(iter(scored.values()))[0], inputs, settings.rounds)
    rows = []
    for importance, (pruned, method_ranks) in scored.items():
        ci = None if importance == "magnitude" else interval(method_ranks, scored["magnitude"][1])[1]
        rows.append(make_row("minilm", f"width-{importance}", "mlp=768", graph, pruned, latency_ratio=latency,
                             metric=float(method_ranks.mean()), metric_ci=ci))
    return rows


def minilm_latency_row(settings: Settings, graph: fxpress.Graph, ctx: PassContext, ranks, grads: int) -> dict:
    """90% 4x1 oBERT blocks + sparse-kernels: native compiled sparse/dense time, stored-weight bytes."""
    pruned = PassManager(f"prune-obs{{sparsity=0.9,block=4x1,score=obs,num_grads={grads}}}").run(graph, ctx).graph
    run = PassManager("sparse-kernels").run(pruned, PassContext())
    sparse = run.graph
    timed = measure(pruned, sparse, ctx.calibration[0], rounds=settings.rounds, paths=("native",), calls=5)
    native = timed["native"]
    log.info("minilm 90%% 4x1 + sparse-kernels: %d linears, native %.2f -> %.2f ms, max err %.2g, bytes x%.3f",
             run.reports[-1].stats.get("replaced", -1), native["dense_ms"], native["sparse_ms"],
             native["max_abs_err"], timed["bytes_ratio"])
    return make_row("minilm", "obs-4x1+sparse-kernels", "sparsity=0.9", graph, sparse,
                    latency_ratio=native["sparse_ms"] / native["dense_ms"], metric=float(ranks(sparse).mean()),
                    bytes_ratio=timed["bytes_ratio"])


# -- SmolLM2: width vs Torch-Pruning vs depth ---------------------------------------------------------------

def block_nll(fn, blocks: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
    """(blocks,) mean next-token cross-entropy of each block (equal token counts: ppl = exp(mean))."""
    values = []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size]
            logits = fn(ids).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            values.append(loss.mean(1).double())
    return torch.cat(values)


def _layer_params(hf) -> int:
    return sum(p.numel() for p in getattr(hf, "model", hf).layers[0].parameters())


def smollm2_rows(settings: Settings) -> list[dict]:
    zoo = load_model("smollm2")
    _, hf = find_hf_model(zoo.module)
    calibration = calibration_batches(zoo, settings.lm_batches, 2)
    capture = lambda module, name: fxpress.capture(module, calibration[0], dynamic=zoo.dynamic_dims,  # noqa: E731
                                                    name=name)
    graph = capture(zoo.module, "smollm2")
    blocks = _lm_blocks(zoo, "pydoc-topics", "test", settings.eval_blocks)
    ctx = PassContext(calibration=calibration, teacher=graph, seed=0)
    distill = f"distill{{steps={settings.distill_steps},lr=1e-4,tail=0}}"
    dense_nll = block_nll(graph, blocks)
    rows = [make_row("smollm2", "dense", "-", graph, graph, latency_ratio=1.0, metric=math.exp(dense_nll.mean()))]
    log.info("smollm2 dense: ppl %.3f on %d blocks", rows[0]["metric"], len(blocks))
    for target in settings.smol_targets:
        options = SMOL_TARGETS[target]
        pruned = {importance: PassManager(f"prune-width{{{options},importance={importance}}}").run(graph, ctx).graph
                  for importance in ("activation", "contribution", "random")}
        log.info("smollm2 %s: prune-width done", target)
        widths = dict(item.split("=") for item in options.split(","))
        for criterion in ("magnitude", "taylor"):
            peer = prune_smollm2_with_torch_pruning(hf, calibration, intermediate=int(widths.get("mlp", 0)) or None,
                                                    heads=int(widths.get("heads", 0)) or None, criterion=criterion)
            pruned[f"tp-{criterion}"] = capture(CausalLMLogits(peer), f"smollm2-tp-{criterion}")
            log.info("smollm2 %s: torch-pruning %s done (params x%.4f)", target, criterion,
                     pruned[f"tp-{criterion}"].num_params / graph.num_params)
        count = round((graph.num_params - pruned[REFERENCE].num_params) / _layer_params(hf))
        pruned["remove-layers"] = PassManager(f"remove-layers{{count={count},metric=angular}}").run(graph, ctx).graph
        log.info("smollm2 %s: remove-layers count=%d", target, count)
        rows += _smollm2_target_rows(settings, graph, ctx, blocks, target, pruned, distill, count)
        if target == settings.smol_targets[-1]:
            export_check(settings, zoo.module, hf, pruned[REFERENCE], blocks[:2], target)
    return rows


def _smollm2_target_rows(settings, graph, ctx, blocks, target, pruned, distill, count) -> list[dict]:
    inputs = ctx.calibration[0]
    width_latency = eager_latency_ratio(graph, pruned[REFERENCE], inputs, settings.rounds)
    depth_latency = eager_latency_ratio(graph, pruned["remove-layers"], inputs, settings.rounds)
    nll = {method: block_nll(g, blocks) for method, g in pruned.items()}
    rows = []
    for method, g in pruned.items():
        started = time.perf_counter()
        distilled = PassManager(distill).run(g, ctx).graph
        ppl_distilled = math.exp(block_nll(distilled, blocks).mean())
        ci = None if method == REFERENCE else interval(nll[method], nll[REFERENCE])[1]
        name = f"remove-layers{{count={count}}}" if method == "remove-layers" else method
        rows.append(make_row("smollm2", name, target, graph, g,
                             latency_ratio=depth_latency if method == "remove-layers" else width_latency,
                             metric=math.exp(nll[method].mean()), metric_ci=ci, metric_distilled=ppl_distilled))
        log.info("smollm2 %s %s: ppl %.3f -> %.3f after distill (%.0f s)", target, name, rows[-1]["metric"],
                 ppl_distilled, time.perf_counter() - started)
    return rows


def export_check(settings: Settings, source, hf, graph: fxpress.Graph, ids: torch.Tensor, target: str) -> None:
    """Export the width-pruned graph as a Hugging Face folder, reload it, compare logits."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            export_hf(graph, source, folder)
            reloaded = load_hf(folder, type(hf))
            with torch.no_grad():
                error = float((reloaded(input_ids=ids, use_cache=False).logits - graph(ids)).abs().max())
            ok = error <= 1e-4
            settings.notes.append(f"{'PASS' if ok else 'FAIL'} smollm2 {target} {REFERENCE}: HF export reloads "
                                  f"({reloaded.config.intermediate_size} mlp, {reloaded.config.num_attention_heads} "
                                  f"heads), max |logits diff| {error:.2g}")
        except Exception as err:  # noqa: BLE001 - a failed export is a result of the benchmark
            settings.notes.append(f"FAIL smollm2 {target} {REFERENCE}: HF export failed: {type(err).__name__}: {err}")


# -- report ------------------------------------------------------------------------------------------------

def acceptance(rows: list[dict], ranks: dict) -> list[str]:
    """oBERT vs magnitude at 70/80% (>= 0.05 MRR, interval above 0); latency cut >= 0.8 x MAC cut for width."""
    lines = []
    minilm = {(r["method"], r["target"]): r for r in rows if r["model"] == "minilm"}
    for (method, target), r in minilm.items():
        baseline = {"obs": "magnitude", "obs-4x1": "magnitude-4x1"}.get(method)
        if baseline is None or target not in ("sparsity=0.7", "sparsity=0.8") or (baseline, target) not in minilm:
            continue
        diff, ci = interval(ranks[method, target], ranks[baseline, target])
        ok = diff >= 0.05 and ci[0] > 0
        lines.append(f"{'PASS' if ok else 'FAIL'} minilm {method} {target}: MRR {r['metric']:.3f} vs {baseline} "
                     f"{minilm[baseline, target]['metric']:.3f}, diff {diff:+.3f} (95% CI {ci[0]:+.3f}..{ci[1]:+.3f}); "
                     "needs >= +0.05 and CI above 0")
    smol = {(r["method"], r["target"]): r for r in rows if r["model"] == "smollm2"}
    for (method, target), r in smol.items():
        if method != REFERENCE:
            continue
        rivals = {m: smol[m, target] for m in ("tp-magnitude", "tp-taylor") if (m, target) in smol}
        for name, rival in rivals.items():
            ok = r["metric"] < rival["metric"] and rival["metric_ci"] is not None and rival["metric_ci"][0] > 0
            lines.append(f"{'PASS' if ok else 'FAIL'} smollm2 {target}: {REFERENCE} ppl {r['metric']:.1f} vs {name} "
                         f"{rival['metric']:.1f} (per-block NLL diff CI {rival['metric_ci']})")
        for m, row in smol.items():
            if m[1] == target and row["metric_distilled"] is not None:
                ok = row["metric_distilled"] < row["metric"]
                lines.append(f"{'PASS' if ok else 'FAIL'} smollm2 {target} {m[0]}: distill lowers ppl "
                             f"{row['metric']:.1f} -> {row['metric_distilled']:.1f}")
    seen = set()
    for r in rows:
        key = (r["model"], r["target"], r["latency_ratio"])
        if r["model"] != "smollm2" or r["method"] == "dense" or r["method"].startswith("remove") or key in seen:
            continue
        seen.add(key)
        cut, needed = 1 - r["latency_ratio"], 0.8 * (1 - r["macs_ratio"])
        lines.append(f"{'PASS' if cut >= needed else 'FAIL'} smollm2 width {r['target']}: latency cut {cut:.3f} "
                     f">= 0.8 x MAC cut {needed:.3f}")
    return lines


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return f"[{value[0]:+.3f},{value[1]:+.3f}]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict]) -> None:
    print_rows(rows, FIELDS, _fmt)
    print("metric: minilm = stdlib-docs test MRR, smollm2 = pydoc-topics perplexity; metric_ci: 95% paired bootstrap"
          " of the difference (minilm: MRR vs magnitude; smollm2: per-block NLL in nats vs contribution)")


def plot(rows: list[dict], path: Path) -> None:
    """params (non-zero params for MiniLM sparsity) vs metric, one line per method and model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("minilm", "smollm2") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        sparse = model == "minilm"
        series = lambda r: r["method"].split("{")[0]  # noqa: E731  remove-layers{count=K} at every target
        for color, method in enumerate(sorted({series(r) for r in rows if r["model"] == model} - {"dense"})):
            chosen = [r for r in rows if r["model"] == model and series(r) == method]
            points = sorted((r["nnz_ratio"] if sparse else r["params_ratio"], r["metric"]) for r in chosen)
            ax.plot(*zip(*points), marker="o", color=f"C{color % 10}", label=method)
            after = sorted((r["params_ratio"], r["metric_distilled"]) for r in chosen if r["metric_distilled"])
            if after:
                ax.plot(*zip(*after), marker="x", linestyle="--", color=f"C{color % 10}", label=f"{method} + distill")
        dense = next((r for r in rows if r["model"] == model and r["method"] == "dense"), None)
        if dense:
            ax.axhline(dense["metric"], color="grey", linewidth=0.8, label="dense")
        ax.set_xlabel("non-zero params / dense" if sparse else "params / dense")
        ax.set_ylabel("stdlib-docs MRR" if sparse else "pydoc perplexity")
        if not sparse:
            ax.set_yscale("log")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="70/80%% sparsity, no Fisher, one SmolLM2 target (mlp=1024,heads=6), 8 distill steps")
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    parser.add_argument("--plot", type=Path, help="write the params vs metric trade-off plot here (png)")
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--max-items", type=int, help="stdlib-docs test pairs (default 400, --quick 200)")
    parser.add_argument("--blocks", type=int, help="pydoc blocks for perplexity (default 64, --quick 16)")
    parser.add_argument("--distill-steps", type=int, help="distill steps per SmolLM2 row (default 40, --quick 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for pruning and evaluation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = Settings(**QUICK) if args.quick else Settings()
    settings.models = tuple(args.models.split(","))
    for name, value in (("max_items", args.max_items), ("eval_blocks", args.blocks),
                        ("distill_steps", args.distill_steps)):
        if value is not None:
            setattr(settings, name, value)
    start, rows = time.perf_counter(), []
    if "minilm" in settings.models:
        rows += minilm_rows(settings)
    if "smollm2" in settings.models:
        rows += smollm2_rows(settings)
    print_table(rows)
    for line in acceptance(rows, settings.ranks) + settings.notes:
        print(line)
    print(f"total time {time.perf_counter() - start:.0f} s ({'quick' if args.quick else 'full'}, "
          f"{args.threads} thread(s))")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
