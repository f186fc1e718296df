"""Latency of each zoo model, wider ViTs and SmolLM2 on every backend, in one run.

    python benchmarks/backends.py [--quick] [--models SPECS] [--tune-trials N] [--tuning-dir DIR] --json PATH

A spec (``--models``, ';'-separated) is a zoo name; ``vit-wW-tT@B``: a timm-style ViT beyond the zoo
(random weights, width W in 192/384, 12 blocks, T = 50 or 197 tokens, batch B); ``smollm2-prefillL``:
SmolLM2-135M logits of an L-token prompt; ``smollm2-decodeP``: one decode step over a past of P tokens,
the graph generation compiles (``fxpress.generation.DecoderStep``; every compiled build keeps the past
length dynamic, as generation does).  Any spec may end in ``+PIPELINE`` for the graph after a pipeline
(``vit-mnist+merge-tokens{r=10,schedule=decreasing}``: the ops passes insert are compiled too); its
eager row is then that graph run by PyTorch.  ``@B`` sets the batch of any image model (default 8).

Backends: eager, torch.compile, onnxruntime, tvm (fxpress default schedules, static shapes),
tvm-dynamic (the wider ViTs: one build with a dynamic batch up to 64, its memory planned for that bound
(``max_sizes``), shared by @1 and @64), tvm-tuned
(MetaSchedule, N trials over the heaviest functions; the database goes to DIR/<model> and is reused by
the next run, else a temporary folder; compile_s of a first run includes ~40 s of TVM start-up).
Default: the zoo, two compressed zoo rows, the 16 wider-ViT configurations (plain and merged) and the
three SmolLM2 rows at threads 1 and 2; --quick: 1 thread, no tuning, 3 rounds, the zoo, the compressed
rows and the width-192 50-token ViTs.  Each row: model, backend, threads, latency_ms (median of
interleaved rounds; configurations of a third of a second or more take one call per round),
ratio_to_eager, ratio_to_onnxruntime, max_abs_err (vs eager, over every output), compile_s; tvm-dynamic
rows add ratio_to_static, the median over rounds of its time / the static build's in the same round
(paired: a 6 ms build's ratio of medians moved 1.02-1.16 between --quick runs).  The summary gives
geometric means against eager and onnxruntime, and each dynamic / static build ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fxpress import backends
from fxpress.errors import LoweringError
from fxpress.ir import capture
from fxpress.passes import PassManager
from fxpress.ir.numerics import compare_outputs
from fxpress.utils.timing import interleaved_latency, measure_latency
from fxpress.generation.decoder import DecoderStep
from fxpress.zoo import load_model
from fxpress.zoo.vit import ViTConfig, VisionTransformer

MODELS = ("vit-mnist", "cnn-digits", "bnn-digits", "minilm", "gdnet-lite")
COMPRESSED = ("vit-mnist+merge-tokens{r=10,schedule=decreasing}", "bnn-digits+binarize,xnor-mst")
IMAGE_BATCH = 8
# timm-style ViTs beyond the zoo (random weights: speed only), 12 blocks, at batch 1 and 64, plain and with
# ToMe merging (r tokens per block: 50 -> 14 tokens, 197 -> 41 as ToMe's ViT-S r=13)
MERGE_R = {50: 3, 197: 13}
MAX_BATCH = 64  # the dynamic builds serve batches up to this (memory planned for it)
WIDE_VITS = tuple(f"vit-w{width}-t{tokens}@{batch}{merge}" for width in (192, 384) for tokens in (50, 197)
                  for batch in (1, MAX_BATCH) for merge in ("", f"+merge-tokens{{r={MERGE_R[tokens]}}}"))
QUICK_WIDE_VITS = tuple(spec for spec in WIDE_VITS if spec.startswith("vit-w192-t50"))
# SmolLM2-135M: prefill logits of one prompt, and one decode step (one token, a past of P tokens) the way
# generation compiles it (fxpress.generation.DecoderStep, the past length dynamic)
SMOLLM2 = ("smollm2-prefill128", "smollm2-prefill512", "smollm2-decode256")
WIDE_VIT = re.compile(r"vit-w(\d+)-t(50|197)$")
SMOLLM2_SPEC = re.compile(r"smollm2-(prefill|decode)(\d+)$")


@dataclass
class BenchModel:
    """One benchmarked configuration: the eager module and its inputs, how its builds are captured."""

    name: str  # the spec, as rows report it
    module: torch.nn.Module
    inputs: tuple
    dynamic_dims: dict | None = None  # capture dims of a dynamic build (a tvm-dynamic row), None: no such row
    always_dynamic: bool = False  # every build keeps dynamic_dims (the decode step's past length)
    family: str = ""  # the spec without its batch: dynamic builds are shared across batches


def bench_inputs(model, batch: int = IMAGE_BATCH) -> tuple:
    """Image models at `batch`; text models at their example batch."""
    if model.task == "classification":
        return tuple(x[:1].expand(batch, *x.shape[1:]).contiguous() for x in model.example_inputs)
    return tuple(model.example_inputs)


def wide_vit(width: int, tokens: int) -> torch.nn.Module:
    """A timm-style ViT (RGB, 16x16 patches, width/64 heads, MLP x4, 1000 classes, 12 blocks) with
    `tokens` = patches + CLS: 50 at 112x112, 197 at 224x224; random weights, seeded."""
    torch.manual_seed(0)
    side = {50: 112, 197: 224}[tokens]
    config = ViTConfig(image_size=side, patch_size=16, in_chans=3, dim=width, depth=12, heads=width // 64,
                       mlp_ratio=4, num_classes=1000)
    return VisionTransformer(config).eval()


def resolve(spec: str, batch: int = IMAGE_BATCH) -> BenchModel:
    """`spec`: a zoo name, ``vit-wW-tT``, ``smollm2-prefillL`` or ``smollm2-decodeP``, each with an
    optional ``@BATCH`` (image models); the pipeline part (``+...``) is applied by the caller."""
    name, _, at = spec.partition("@")
    batch = int(at) if at else batch
    if match := WIDE_VIT.match(name):
        width, tokens = int(match[1]), int(match[2])
        module = wide_vit(width, tokens)
        side = module.config.image_size
        images = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
        return BenchModel(spec, module, (images,), dynamic_dims={0: {0: "batch"}}, family=name)
    if match := SMOLLM2_SPEC.match(name):
        zoo = load_model("smollm2")
        length = int(match[2])
        ids = torch.randint(0, zoo.module.model.config.vocab_size, (1, length if match[1] == "prefill" else 1),
                            generator=torch.Generator().manual_seed(1))
        if match[1] == "prefill":
            return BenchModel(spec, zoo.module, (ids,), family=name)
        step = DecoderStep(zoo.module).eval()
        past = torch.randn(step.num_layers, 1, step.kv_heads, length, step.head_dim,
                           generator=torch.Generator().manual_seed(2))
        return BenchModel(spec, step, (ids, torch.tensor([[length]]), past, past.clone()),
                          dynamic_dims={2: {3: "past"}, 3: {3: "past"}}, always_dynamic=True, family=name)
    model = load_model(name)
    return BenchModel(spec, model.module, bench_inputs(model, batch), family=name)


_DYNAMIC_BUILDS: dict[str, tuple] = {}  # family+pipeline -> (compiled, compile s): one build serves every batch


def build_backends(bench: BenchModel, tune_trials: int, tuning_dir: str | None = None,
                   pipeline: str = "", skip: frozenset = frozenset()) -> dict[str, tuple]:
    """backend name -> (callable, compile seconds), without the backends named in `skip`."""
    inputs = bench.inputs
    dims = bench.dynamic_dims if bench.always_dynamic else False
    graph = capture(bench.module, inputs, name=bench.name, dynamic=dims)
    eager = bench.module
    if pipeline:
        graph = PassManager(pipeline).run(graph).graph
        eager = graph.module
    built: dict[str, tuple] = {"eager": (eager, 0.0)}
    if "torch.compile" not in skip:
        start = time.perf_counter()
        compiled_fn = torch.compile(eager, dynamic=bench.always_dynamic or None)
        with torch.no_grad():
            compiled_fn(*inputs)
        built["torch.compile"] = (compiled_fn, time.perf_counter() - start)
    for name, target in (("onnxruntime", "onnx"), ("tvm", "llvm")):
        if name in skip:
            continue
        try:
            compiled = backends.compile(graph, target, dynamic=bench.always_dynamic)
        except LoweringError as err:  # ONNX has no form of the custom ops some passes insert
            print(f"  {name} skipped for {bench.name}: {str(err)[:160]}")
            continue
        built[name] = (compiled, compiled.info["compile_s"])
    if bench.dynamic_dims and not bench.always_dynamic and "tvm-dynamic" not in skip:
        key = f"{bench.family}+{pipeline}"
        if key not in _DYNAMIC_BUILDS:
            dynamic = capture(bench.module, inputs, name=bench.name, dynamic=bench.dynamic_dims)
            if pipeline:
                dynamic = PassManager(pipeline).run(dynamic).graph
            compiled = backends.compile(dynamic, "llvm", dynamic=True, max_sizes=MAX_BATCH)
            _DYNAMIC_BUILDS[key] = (compiled, compiled.info["compile_s"])
        built["tvm-dynamic"] = _DYNAMIC_BUILDS[key]
    if tune_trials:
        folder = str(Path(tuning_dir) / bench.name) if tuning_dir else None
        try:
            compiled = backends.compile(graph, "llvm", tune_trials=tune_trials, tuning_dir=folder,
                                        dynamic=bench.always_dynamic)
            built["tvm-tuned"] = (compiled, compiled.info["compile_s"])
        except Exception as err:  # noqa: BLE001 - report and go on with the other backends
            print(f"  tvm-tuned skipped for {bench.name}: {err}")
    return built


def measure(model_name: str, threads_list: list[int], tune_trials: int, rounds: int,
            tuning_dir: str | None = None, batch: int = IMAGE_BATCH, skip: frozenset = frozenset()) -> list[dict]:
    spec, _, pipeline = model_name.partition("+")
    bench = resolve(spec, batch)
    torch.set_num_threads(min(threads_list))  # tvm-tuned times its candidates with this many threads
    built = build_backends(bench, tune_trials, tuning_dir, pipeline, skip)
    inputs = bench.inputs
    with torch.no_grad():
        reference = built["eager"][0](*inputs)
    # heavy configurations (0.3 s or more per eager call) get one timed call per round
    heavy = measure_latency(built["eager"][0], inputs, warmup=0, min_runs=1, max_runs=1).median_ms > 300
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for fn, _ in built.values():
            if isinstance(fn, backends.CompiledModel):
                fn.set_threads(threads)
        per_round = [interleaved_latency({n: fn for n, (fn, _) in built.items()}, inputs, rounds=1,
                                         min_runs=1 if heavy else 3, warmup=0 if heavy else 1)
                     for _ in range(rounds)]
        latency = {name: statistics.median(r[name].median_ms for r in per_round) for name in built}
        eager_ms = latency["eager"]
        ort_ms = latency.get("onnxruntime")
        for name, (fn, compile_s) in built.items():
            with torch.no_grad():
                error = compare_outputs(reference, fn(*inputs)).max_abs
            rows.append({"model": model_name, "backend": name, "threads": threads,
                         "latency_ms": round(latency[name], 4),
                         "ratio_to_eager": round(latency[name] / eager_ms, 3),
                         "ratio_to_onnxruntime": round(latency[name] / ort_ms, 3) if ort_ms else None,
                         "max_abs_err": float(f"{error:.3g}"), "compile_s": round(compile_s, 2)})
            if name == "tvm-dynamic" and "tvm" in built:  # paired: each round's two medians, timed back to back
                rows[-1]["ratio_to_static"] = round(statistics.median(
                    r[name].median_ms / r["tvm"].median_ms for r in per_round), 3)
    return rows


def print_table(rows: list[dict]) -> None:
    width = max(12, *(len(r["model"]) + 2 for r in rows))
    header = (f"{'model':<{width}}{'backend':<15}{'thr':>4}{'ms':>10}{'x eager':>9}{'x ort':>7}{'max err':>10}"
              f"{'compile s':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ort = r.get("ratio_to_onnxruntime")
        print(f"{r['model']:<{width}}{r['backend']:<15}{r['threads']:>4}{r['latency_ms']:>10.3f}"
              f"{r['ratio_to_eager']:>9.2f}{ort if ort is not None else float('nan'):>7.2f}"
              f"{r['max_abs_err']:>10.2g}{r['compile_s']:>11.1f}")
    for backend in sorted({r["backend"] for r in rows} - {"eager"}):
        for key, against in (("ratio_to_eager", "eager"), ("ratio_to_onnxruntime", "onnxruntime")):
            ratios = [r[key] for r in rows if r["backend"] == backend and r["threads"] == 1 and r["model"] in MODELS
                      and r.get(key)]
            if ratios and backend != against:
                geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                print(f"geomean {backend} / {against} (1 thread, {len(ratios)} zoo models): {geo:.2f}")
    by_key = {(r["model"], r["backend"], r["threads"]): r for r in rows}
    for (model, backend, threads), row in by_key.items():
        if backend == "tvm-dynamic" and row.get("ratio_to_static") is not None:
            print(f"{model} ({threads} thr): dynamic / static batch build {row['ratio_to_static']:.2f} "
                  "(median of the rounds' ratios)")


def split_models(text: str) -> list[str]:
    """';'-separated specs; plain zoo names may also be ','-separated (pipelines contain commas)."""
    parts = text.split(";") if ";" in text or "+" in text else text.split(",")
    return [part.strip() for part in parts if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 thread, no tuning, fewer rounds")
    parser.add_argument("--models", help="';'-separated specs: zoo names, vit-wW-tT@BATCH, smollm2-prefillL, "
                        "smollm2-decodeP, each with an optional +PIPELINE (default: all of them; --quick: the zoo, "
                        "the compressed zoo rows and the width-192 50-token ViTs)")
    parser.add_argument("--tune-trials", type=int, default=64, help="MetaSchedule trials per model (0: no tvm-tuned)")
    parser.add_argument("--tuning-dir", help="keep tuning databases in DIR/<model> and reuse them")
    parser.add_argument("--batch", type=int, default=IMAGE_BATCH, help="batch of the image models")
    parser.add_argument("--skip", default="", help="comma list of backends not to build (torch.compile, onnxruntime, "
                        "tvm, tvm-dynamic): torch.compile of SmolLM2's decode step takes minutes")
    parser.add_argument("--json", help="write {'rows': [...]} here")
    args = parser.parse_args()
    threads = [1] if args.quick else [1, 2]
    trials = 0 if args.quick else args.tune_trials
    default = MODELS + COMPRESSED + (QUICK_WIDE_VITS if args.quick else WIDE_VITS + SMOLLM2)
    rows: list[dict] = []
    for name in split_models(args.models) if args.models else default:
        print(f"== {name}", flush=True)
        rows += measure(name, threads, trials, rounds=3 if args.quick else 5, tuning_dir=args.tuning_dir,
                        batch=args.batch, skip=frozenset(filter(None, args.skip.split(","))))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
