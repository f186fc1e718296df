"""Quantization benchmark: RTN, GPTQ, quantized-distill, diff-quant and torchao peers on zoo models, in one run.

    python benchmarks/quant.py [--quick] [--json PATH] [--only smollm2,minilm,vit-mnist,cnn-digits]
                               [--methods "rtn int2 int-zero;quantized-distill int2"]
                               [--blocks N] [--max-items N] [--steps-scale X] [--train-threads N]

SmolLM2-135M: perplexity on ``--blocks`` 64-token test blocks of both pydoc-topics and Shakespeare;
calibration mixes the train splits of both (GPTQ calibrated on one domain loses on the other).  Its
weights come from a Q4_1 GGUF, so ``quantize{bits=4,group=32,zero=float}`` reproduces them (a row flagged
in ``note``); the 4-bit comparisons use integer zero points.  MiniLM: stdlib-docs test MRR over
``--max-items`` pairs.  vit-mnist and cnn-digits: top-1 accuracy on the whole test split; their calibration
images are spread over the training split (``calibration_batches``).

Rows (``--json``): model, method, bits, group, bytes_ratio, bits_per_weight, metric_by_domain,
metric_delta, seconds, latency_b1_ratio, latency_b64_ratio (and ``note`` where something needs saying).

- bytes_ratio: stored bytes of the weights `quantize` would choose in the fp32 graph (every linear but the
  head) after the method, over their fp32 bytes.  Measured as (param_bytes(method) - param_bytes of the
  rest) / fp32 bytes of those weights, so layers a method keeps float (the first linears of
  quantized-distill) count at 4 bytes a weight, and removed blocks count 0.  bits_per_weight = 32 x that.
  torchao rows count the stored tensors inside its tensor subclasses.
- metric_delta: relative change of perplexity (+0.05 = 5% worse) or accuracy / MRR difference in points.
- seconds: the pass pipeline's wall time, at --train-threads threads (default 1; torchao: quantize_'s).
- latency ratios: forward time of the method over the fp32 graph, thread CPU time at 1 thread, median of
  interleaved rounds; quantized graphs compiled with the native target (4-bit and per-channel 8-bit on the
  C kernels, 2/3-bit and codebooks on the op's reference), torchao modules eager against the fp32 module.
  LMs get one-token inputs (batch, 1): batch 1 is a decode-like step (no KV cache).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import fxpress
from fxpress.errors import first_line
from fxpress.eval import calibration_batches, evaluate, task_loss_for
from fxpress.passes import PassContext, PassManager
from fxpress.passes.quant.quantize import Quantize, layer_weight
from fxpress.zoo import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.table import print_rows, start_run, thread_ms  # noqa: E402

log = logging.getLogger("benchmarks.quant")

FIELDS = ("model", "method", "bits", "group", "bytes_ratio", "bits_per_weight", "metric_by_domain", "metric_delta",
          "seconds", "latency_b1_ratio", "latency_b64_ratio")
MODELS = ("smollm2", "minilm", "vit-mnist", "cnn-digits")
LM_DOMAINS = ("pydoc-topics", "shakespeare")
PER_CHANNEL = "int8 per-channel"  # the int8 row: one quantize per distinct K, group = K (native Int8Linear)
PER_CHANNEL_NOTE = "sym, group = K (one scale per output channel): one quantize per distinct K"


@dataclass(frozen=True)
class Method:
    """One row: a pass pipeline (``{steps}`` is filled in from the settings), a torchao config, or fp32."""

    name: str
    bits: int | None = None
    group: int | None = None
    pipeline: str = ""
    peer: str = ""  # torchao: "int8", "int4", "intx-int4"
    steps: int = 0  # training steps of the pipeline (scaled by --steps-scale, and in --quick)
    note: str = ""
    quick: bool = False  # part of --quick
    batch_size: int | None = None  # calibration rows per batch instead of the model plan's (same batch count)


# SmolLM2 settings of quantized-distill and diff-quant: the best of the sweep in docs/quantization.md.
SMOL_QD4 = "quantized-distill{bits=4,group=32,zero=int,init=gptq,lr=5e-05,steps={steps},train_float=true,alpha=1.0,T=1.0}"
SMOL_QD2 = ("quantized-distill{bits=2,group=32,zero=int,grid=learned,blockwise=4,lr=1e-04,grid_lr=1e-03,steps={steps},"
            "train_float=true,alpha=1.0,T=1.0}")
SMOL_DQ2 = "diff-quant{bits=2,group=32,zero=int,steps={steps},lr=0.01,alpha=1.0,T=1.0}"
SMOL_SHALLOW = "remove-layers{count=3,metric=angular},"  # 30 -> 27 blocks

SMOLLM2 = (
    Method("fp32", quick=True),
    Method("rtn q4_1 (float zero)", 4, 32, "quantize{bits=4,group=32,zero=float}",
           note="reproduces the GGUF Q4_1 source weights (expected ~ fp32)"),
    Method(PER_CHANNEL, 8, None, note=PER_CHANNEL_NOTE),
    Method("rtn int4 int-zero", 4, 32, "quantize{bits=4,group=32,zero=int}", quick=True),
    Method("rtn int4 int-zero", 4, 64, "quantize{bits=4,group=64,zero=int}"),
    Method("gptq int4 int-zero", 4, 32, "quantize{bits=4,group=32,zero=int,method=gptq}"),
    Method("torchao int8 weight-only", 8, None, peer="int8"),
    Method("torchao int4 weight-only", 4, 32, peer="int4"),
    Method("torchao intx int4 weight-only", 4, 32, peer="intx-int4",
           note="IntxWeightOnlyConfig(int4, PerGroup(32)): codes stored unpacked as int8"),
    Method("rtn int3 int-zero", 3, 32, "quantize{bits=3,group=32,zero=int}"),
    Method("gptq int3 int-zero", 3, 32, "quantize{bits=3,group=32,zero=int,method=gptq}"),
    Method("rtn int2 int-zero", 2, 32, "quantize{bits=2,group=32,zero=int}", quick=True),
    Method("gptq int2 int-zero", 2, 32, "quantize{bits=2,group=32,zero=int,method=gptq}"),
    Method("quantized-distill int4", 4, 32, SMOL_QD4, steps=200, quick=True),
    Method("quantized-distill int2", 2, 32, SMOL_QD2, steps=100, batch_size=4,
           note="learned grid, 4 epochs of block-wise reconstruction, then 100 end-to-end steps; calibration "
                "batches of 4 rows"),
    Method("diff-quant int2", 2, 32, SMOL_DQ2, steps=100),
    Method("remove-layers 3 + quantized-distill int4", 4, 32,
           SMOL_SHALLOW + SMOL_QD4.replace("T=1.0}", "T=1.0,teacher=context}"), steps=200,
           note="27 of 30 blocks; the fp32 30-block graph is the teacher; bytes count the removed blocks as 0"),
)

SMALL = (  # MiniLM, vit-mnist, cnn-digits: the passes' defaults (first and last layers float)
    Method("fp32", quick=True),
    Method(PER_CHANNEL, 8, None, note=PER_CHANNEL_NOTE, quick=True),
    Method("rtn int4 int-zero", 4, 32, "quantize{bits=4,group=32,zero=int}", quick=True),
    Method("gptq int4 int-zero", 4, 32, "quantize{bits=4,group=32,zero=int,method=gptq}", quick=True),
    Method("rtn int2 int-zero", 2, 32, "quantize{bits=2,group=32,zero=int}"),
    Method("gptq int2 int-zero", 2, 32, "quantize{bits=2,group=32,zero=int,method=gptq}"),
    Method("quantized-distill int4", 4, 32, "quantized-distill{bits=4,group=32,zero=int,steps={steps}}", steps=100,
           quick=True),
    Method("quantized-distill int2", 2, 32, "quantized-distill{bits=2,group=32,zero=int,steps={steps}}", steps=100),
    Method("diff-quant int2", 2, 32, "diff-quant{bits=2,group=32,zero=int,steps={steps}}", steps=100, quick=True),
)


@dataclass(frozen=True)
class ModelPlan:
    name: str
    methods: tuple[Method, ...]
    calibration: int  # batches (SmolLM2: per domain)
    batch_size: int | None
    domains: tuple[str, ...] = ("default",)


PLANS = {
    "smollm2": ModelPlan("smollm2", SMOLLM2, calibration=16, batch_size=2, domains=LM_DOMAINS),
    "minilm": ModelPlan("minilm", SMALL, calibration=8, batch_size=8),
    "vit-mnist": ModelPlan("vit-mnist", SMALL, calibration=16, batch_size=100),
    "cnn-digits": ModelPlan("cnn-digits", SMALL, calibration=16, batch_size=100),
}


@dataclass
class Settings:
    quick: bool = False
    blocks: int = 64  # SmolLM2 perplexity blocks of 64 tokens per domain
    max_items: int = 400  # MiniLM query/document pairs
    steps_scale: float = 1.0
    calibration_scale: float = 1.0
    rounds: int = 5  # interleaved latency rounds
    calls: int = 3  # timed calls per round
    models: tuple[str, ...] = MODELS
    methods: tuple[str, ...] = ()  # row names to run (the fp32 row always runs); empty: all
    train_threads: int = 1  # torch threads of the pass pipelines (evaluation and latency: 1)
    notes: list[str] = field(default_factory=list)


QUICK = dict(quick=True, blocks=8, max_items=100, steps_scale=0.05, calibration_scale=0.25, rounds=3, calls=2)


# -- measurements ----------------------------------------------------------------------------------------------

def metric_by_domain(zoo, fn: Callable, plan: ModelPlan, settings: Settings) -> dict[str, float]:
    """{domain: the task metric} (perplexity per text for LMs; accuracy or MRR on the model's test split)."""
    values = {}
    for domain in plan.domains:
        if zoo.task == "causal-lm":
            scores = evaluate(zoo, fn, domain, blocks=settings.blocks)
        elif zoo.task == "embedding":
            scores = evaluate(zoo, fn, max_items=settings.max_items)
        else:
            scores = evaluate(zoo, fn)
        label = domain if domain != "default" else zoo.dataset or "stdlib-docs"
        values[label] = round(float(next(iter(scores.values()))), 4)
    return values


def metric_delta(zoo, values: dict[str, float], fp32: dict[str, float]) -> dict[str, float]:
    """Relative perplexity change, or the accuracy / MRR difference in points."""
    if zoo.task == "causal-lm":
        return {d: round(values[d] / fp32[d] - 1, 4) for d in values}
    return {d: round(100 * (values[d] - fp32[d]), 2) for d in values}


def latency_ratio(fp32: Callable, method: Callable, inputs: tuple, settings: Settings) -> float:
    """method / fp32 time at 1 thread: medians over interleaved rounds, so machine noise hits both alike."""
    samples: dict[str, list[float]] = {"fp32": [], "method": []}
    with torch.no_grad():
        fp32(*inputs), method(*inputs)
        for _ in range(settings.rounds):
            samples["fp32"].append(thread_ms(fp32, inputs, settings.calls))
            samples["method"].append(thread_ms(method, inputs, settings.calls))
    return statistics.median(samples["method"]) / statistics.median(samples["fp32"])


def latency_inputs(zoo, calibration: list[tuple], batch: int) -> tuple:
    """Inputs of `batch` rows: one token per row for a causal LM (a decode-like step), else calibration rows."""
    if zoo.task == "causal-lm":
        return (calibration[0][0][:1, :1].expand(batch, 1).contiguous(),)
    rows = calibration[0]
    repeat = -(-batch // rows[0].shape[0])
    return tuple(t.repeat(repeat, *([1] * (t.dim() - 1)))[:batch].contiguous() for t in rows)


# -- bytes -------------------------------------------------------------------------------------------------------

def quantizable_bytes(graph: fxpress.Graph) -> int:
    """fp32 bytes of the weights `quantize` chooses by default (every linear but the head)."""
    layers, _ = Quantize().plan(graph)
    return sum(layer_weight(graph, layer).numel() * 4 for layer in layers)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores, looking inside tensor subclasses (torchao) by their flattened inner tensors."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(stored_bytes(getattr(tensor, name)) for name in names)


def module_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += stored_bytes(tensor)
    return total


# -- per-channel int8 and torchao peers --------------------------------------------------------------------------

def per_channel_int8(graph: fxpress.Graph) -> str:
    """One `quantize{bits=8,scheme=sym,group=K}` per distinct K, its targets the layer paths with block numbers
    as globs: group = K gives one scale per output channel (the native Int8Linear layout)."""
    by_k: dict[int, set[str]] = {}
    layers, _ = Quantize().plan(graph)
    for layer in layers:
        by_k.setdefault(layer_weight(graph, layer).shape[1], set()).add(re.sub(r"\.\d+\.", ".*.", layer.name))
    globs = {k: {g for g in names if all(g not in other for kk, other in by_k.items() if kk != k)}
             for k, names in by_k.items()}
    if any(len(g) != len(by_k[k]) for k, g in globs.items()):  # a glob covers two K: use exact paths
        globs = {k: {layer.name for layer in layers if layer_weight(graph, layer).shape[1] == k} for k in by_k}
    return ",".join(f"quantize{{bits=8,scheme=sym,group={k},targets={';'.join(sorted(g))}}}"
                    for k, g in sorted(globs.items()))


def torchao_module(module: torch.nn.Module, peer: str, chosen: set[str]) -> torch.nn.Module:
    """A quantized copy of `module` by torchao: the nn.Linear modules named in `chosen` (those `quantize` picks)."""
    from torchao.quantization import (Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup,
                                      quantize_)

    configs = {"int8": lambda: Int8WeightOnlyConfig(),
               "int4": lambda: Int4WeightOnlyConfig(group_size=32),
               "intx-int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))}
    quantized = copy.deepcopy(module)
    quantize_(quantized, configs[peer](), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in chosen)
    return quantized


# -- rows --------------------------------------------------------------------------------------------------------

@dataclass
class Baseline:
    """What every row of a model is compared with: the fp32 graph, its metric, bytes and latency inputs."""

    zoo: Any
    plan: ModelPlan
    graph: fxpress.Graph
    ctx: PassContext
    metric: dict[str, float]
    weight_bytes: int  # fp32 bytes of the weights quantize chooses
    inputs: dict[int, tuple]  # batch -> latency inputs
    chosen: set[str]  # their module paths
    kept_note: str = ""  # said on every row when quantize's plan keeps more linears float than the head


def pipeline_text(method: Method, baseline: Baseline, settings: Settings) -> str:
    if method.name == PER_CHANNEL:
        return per_channel_int8(baseline.graph)
    steps = max(1, round(method.steps * settings.steps_scale))
    return method.pipeline.replace("{steps}", str(steps))


def make_row(baseline: Baseline, method: Method, values: dict[str, float] | None, bytes_after: int | None,
             seconds: float, latency: dict[int, float | None], note: str) -> dict:
    ratio = None if bytes_after is None else bytes_after / baseline.weight_bytes
    row = {"model": baseline.plan.name, "method": method.name, "bits": method.bits, "group": method.group,
           "bytes_ratio": None if ratio is None else round(ratio, 4),
           "bits_per_weight": None if ratio is None else round(32 * ratio, 3),
           "metric_by_domain": values,
           "metric_delta": None if values is None else metric_delta(baseline.zoo, values, baseline.metric),
           "seconds": round(seconds, 1), "latency_b1_ratio": latency.get(1), "latency_b64_ratio": latency.get(64)}
    note = "; ".join(filter(None, [note, baseline.kept_note if method.bits else ""]))
    if note:
        row["note"] = note
    return row


def latencies(baseline: Baseline, fp32: Callable, runner: Callable, settings: Settings) -> dict[int, float]:
    return {batch: round(latency_ratio(fp32, runner, inputs, settings), 3) for batch, inputs in baseline.inputs.items()}


def pipeline_row(baseline: Baseline, method: Method, settings: Settings) -> dict:
    text = pipeline_text(method, baseline, settings)
    ctx = baseline.ctx
    if method.batch_size is not None:
        ctx = PassContext(calibration=calibration_for(baseline.zoo, baseline.plan, settings, method.batch_size),
                          loss=ctx.loss, teacher=ctx.teacher, seed=0)
    started = time.perf_counter()
    torch.set_num_threads(settings.train_threads)  # the pipeline; latency stays at 1 thread
    try:
        result = PassManager(text).run(baseline.graph, ctx)
    finally:
        torch.set_num_threads(1)
    seconds = time.perf_counter() - started
    graph, notes = result.graph, [method.note] if method.note else []
    values = metric_by_domain(baseline.zoo, graph, baseline.plan, settings)
    rest = baseline.graph.param_bytes - baseline.weight_bytes
    trained = [r.stats for r in result.reports if "kl_after" in r.stats]
    if trained:
        notes.append(f"KL on calibration {trained[-1]['kl_before']} -> {trained[-1]['kl_after']}")
    try:
        compiled = fxpress.backends.compile(graph, "native", dynamic=True)
        kernels = sorted({k.split(" ")[0] for k in compiled.info.get("quantized_kernels", {}).values()})
        latency = latencies(baseline, baseline.graph, compiled, settings)
        notes.append(f"native kernels: {', '.join(kernels) or 'none'}")
    except Exception as err:  # noqa: BLE001 - a row without latency, saying why
        latency = {}
        notes.append(f"latency not measured: native compile failed: {first_line(err)}")
    log.info("%s %s: %s (%.0f s)", baseline.plan.name, method.name, values, seconds)
    return make_row(baseline, method, values, graph.param_bytes - rest, seconds, latency, "; ".join(notes))


def torchao_row(baseline: Baseline, method: Method, settings: Settings) -> dict:
    module = baseline.zoo.module
    started = time.perf_counter()
    try:
        quantized = torchao_module(module, method.peer, baseline.chosen)
        values = metric_by_domain(baseline.zoo, quantized, baseline.plan, settings)
    except Exception as err:  # noqa: BLE001 - the peer cannot run here: keep the row, say why
        note = f"torchao failed: {type(err).__name__}: {first_line(err)}"
        log.info("%s %s: %s", baseline.plan.name, method.name, note)
        return make_row(baseline, method, None, None, time.perf_counter() - started, {}, note)
    seconds = time.perf_counter() - started
    rest = module_bytes(module) - baseline.weight_bytes
    latency = latencies(baseline, module, quantized, settings)
    note = "; ".join(filter(None, [method.note, "eager torchao module vs the eager fp32 module"]))
    log.info("%s %s: %s (%.0f s)", baseline.plan.name, method.name, values, seconds)
    return make_row(baseline, method, values, module_bytes(quantized) - rest, seconds, latency, note)


def calibration_for(zoo, plan: ModelPlan, settings: Settings, batch_size: int | None) -> list[tuple]:
    count = max(1, round(plan.calibration * settings.calibration_scale))
    if zoo.task == "causal-lm":  # both domains' train splits, interleaved
        mixed = zip(calibration_batches(zoo, count, batch_size, source="pydoc-topics"),
                    calibration_batches(zoo, count, batch_size))
        return [batch for pair in mixed for batch in pair]
    return calibration_batches(zoo, count, batch_size)


def prepare(plan: ModelPlan, settings: Settings) -> Baseline:
    zoo = load_model(plan.name)
    calibration = calibration_for(zoo, plan, settings, plan.batch_size)
    graph = fxpress.capture(zoo.module, calibration[0], dynamic=zoo.dynamic_dims, name=plan.name)
    ctx = PassContext(calibration=calibration, loss=task_loss_for(zoo), teacher=graph, seed=0)
    layers, left = Quantize().plan(graph)
    chosen = {use.module for layer in layers for use in layer.uses}
    kept = [use.module for use in left if use.kind == "linear"]
    kept_note = "" if len(kept) < 2 else (f"quantize's head rule keeps {len(kept)} linears float ({kept[0]}, "
                                          f"{kept[1]}, ...): {len(chosen)} quantized")
    metric = metric_by_domain(zoo, graph, plan, settings)
    inputs = {batch: latency_inputs(zoo, calibration, batch) for batch in (1, 64)}
    return Baseline(zoo, plan, graph, ctx, metric, quantizable_bytes(graph), inputs, chosen, kept_note)


def model_rows(plan: ModelPlan, settings: Settings) -> list[dict]:
    started = time.perf_counter()
    baseline = prepare(plan, settings)
    log.info("%s fp32: %s (%.0f s)", plan.name, baseline.metric, time.perf_counter() - started)
    rows = [make_row(baseline, plan.methods[0], baseline.metric, baseline.weight_bytes, 0.0, {1: 1.0, 64: 1.0}, "")]
    for method in plan.methods[1:]:
        wanted = method.name in settings.methods if settings.methods else method.quick or not settings.quick
        if not wanted:
            continue
        try:
            rows.append(torchao_row(baseline, method, settings) if method.peer else
                        pipeline_row(baseline, method, settings))
        except Exception as err:  # noqa: BLE001 - one failing row does not end the run: it says why
            log.warning("%s %s failed: %s", plan.name, method.name, first_line(err))
            rows.append(make_row(baseline, method, None, None, 0.0, {}, f"failed: {first_line(err)}"))
    return rows


# -- output ------------------------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return "/".join(_fmt(v) for v in value.values())
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict]) -> None:
    print_rows(rows, FIELDS, _fmt)
    print("metric: smollm2 = perplexity pydoc-topics/shakespeare (lower is better, delta relative), minilm = "
          "stdlib-docs MRR, vit-mnist / cnn-digits = accuracy (delta in points); ratios are method / fp32")
    for r in rows:
        if r.get("note"):
            print(f"  {r['model']} {r['method']} (g{r['group']}): {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset of rows, 8 blocks, 5%% of the steps")
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    parser.add_argument("--only", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--methods", default="", help="semicolon-separated row names to run instead of the (quick) subset; fp32 always runs")
    parser.add_argument("--train-threads", type=int, default=1,
                        help="torch threads while a row's pass pipeline runs (seconds then count them); latency and "
                             "evaluation stay at 1 thread")
    parser.add_argument("--blocks", type=int, help="64-token blocks per domain for SmolLM2 (default 64, quick 8)")
    parser.add_argument("--max-items", type=int, help="MiniLM stdlib-docs pairs (default 400, quick 100)")
    parser.add_argument("--steps-scale", type=float, help="scale every training row's steps (quick 0.05)")
    args = parser.parse_args(argv)
    start_run(log, 1)
    settings = Settings(**QUICK) if args.quick else Settings()
    settings.models = tuple(args.only.split(","))
    settings.train_threads = args.train_threads
    settings.methods = tuple(filter(None, (name.strip() for name in args.methods.split(";"))))
    known = {method.name for plan in PLANS.values() for method in plan.methods}
    unknown = [name for name in settings.methods if name not in known]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; known: {'; '.join(sorted(known))}")
    for name, value in (("blocks", args.blocks), ("max_items", args.max_items), ("steps_scale", args.steps_scale)):
        if value is not None:
            setattr(settings, name, value)
    start, rows = time.perf_counter(), []
    for name in settings.models:
        if name not in PLANS:
            parser.error(f"unknown model {name!r}; known: {', '.join(PLANS)}")
        rows += model_rows(PLANS[name], settings)
        if args.json:  # after every model, so a long run leaves what it measured
            args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    print_table(rows)
    print(f"total time {time.perf_counter() - start:.0f} s ({'quick' if args.quick else 'full'}, 1 thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
