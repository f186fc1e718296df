"""Latency of each zoo model on every backend, in one run.

    python benchmarks/backends.py [--quick] [--models vit-mnist,minilm] [--tune-trials N]
                                  [--tuning-dir DIR] --json PATH

A model is a zoo name, or ``NAME+PIPELINE`` for the graph after a pipeline
(``vit-mnist+merge-tokens{r=10,schedule=decreasing}``: the ops passes insert
are compiled too); its eager row is then that graph run by PyTorch.

Backends: eager, torch.compile, onnxruntime, tvm (fxpress default schedules),
tvm-tuned (MetaSchedule, N trials over the heaviest functions; the database
goes to DIR/<model> and is reused by the next run, else a temporary folder;
compile_s of a first run includes ~40 s of TVM start-up for tuning).
Threads 1 and 2 (--quick: 1 thread, no tuning).  Each row: model, backend, threads,
latency_ms (median of interleaved rounds), ratio_to_eager, ratio_to_onnxruntime,
max_abs_err (vs eager), compile_s.  The summary gives the geometric means against
eager and against onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fxpress import backends
from fxpress.errors import LoweringError
from fxpress.ir import capture
from fxpress.passes import PassManager
from fxpress.utils.timing import interleaved_latency
from fxpress.zoo import load_model

MODELS = ("vit-mnist", "cnn-digits", "bnn-digits", "minilm", "gdnet-lite")
COMPRESSED = ("vit-mnist+merge-tokens{r=10,schedule=decreasing}", "bnn-digits+binarize,xnor-mst")
IMAGE_BATCH = 8


def bench_inputs(model, batch: int = IMAGE_BATCH) -> tuple:
    """Image models at `batch`; text models at their example batch."""
    if model.task == "classification":
        return tuple(x[:1].expand(batch, *x.shape[1:]).contiguous() for x in model.example_inputs)
    return tuple(model.example_inputs)


def build_backends(model, inputs, tune_trials: int, tuning_dir: str | None = None,
                   pipeline: str = "") -> dict[str, tuple]:
    """backend name -> (callable, compile seconds)."""
    graph = capture(model.module, inputs, name=model.name)
    eager = model.module
    if pipeline:
        graph = PassManager(pipeline).run(graph).graph
        eager = graph.module
    built: dict[str, tuple] = {"eager": (eager, 0.0)}
    start = time.perf_counter()
    compiled_fn = torch.compile(eager)
    with torch.no_grad():
        compiled_fn(*inputs)
    built["torch.compile"] = (compiled_fn, time.perf_counter() - start)
    for name, target in (("onnxruntime", "onnx"), ("tvm", "llvm")):
        try:
            compiled = backends.compile(graph, target)
        except LoweringError as err:  # ONNX has no form of the custom ops some passes insert
            print(f"  {name} skipped for {model.name}: {str(err)[:160]}")
            continue
        built[name] = (compiled, compiled.info["compile_s"])
    if tune_trials:
        folder = str(Path(tuning_dir) / model.name) if tuning_dir else None
        try:
            compiled = backends.compile(graph, "llvm", tune_trials=tune_trials, tuning_dir=folder)
            built["tvm-tuned"] = (compiled, compiled.info["compile_s"])
        except Exception as err:  # noqa: BLE001 - report and go on with the other backends
            print(f"  tvm-tuned skipped for {model.name}: {err}")
    return built


def measure(model_name: str, threads_list: list[int], tune_trials: int, rounds: int,
            tuning_dir: str | None = None, batch: int = IMAGE_BATCH) -> list[dict]:
    name, _, pipeline = model_name.partition("+")
    model = load_model(name)
    inputs = bench_inputs(model, batch)
    torch.set_num_threads(min(threads_list))  # tvm-tuned times its candidates with this many threads
    built = build_backends(model, inputs, tune_trials, tuning_dir, pipeline)
    with torch.no_grad():
        reference = built["eager"][0](*inputs)
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for fn, _ in built.values():
            if isinstance(fn, backends.CompiledModel):
                fn.set_threads(threads)
        latency = interleaved_latency({n: fn for n, (fn, _) in built.items()}, inputs, rounds=rounds)
        eager_ms = latency["eager"].median_ms
        ort_ms = latency["onnxruntime"].median_ms if "onnxruntime" in latency else None
        for name, (fn, compile_s) in built.items():
            with torch.no_grad():
                error = (fn(*inputs) - reference).abs().max().item()
            rows.append({"model": model_name, "backend": name, "threads": threads,
                         "latency_ms": round(latency[name].median_ms, 4),
                         "ratio_to_eager": round(latency[name].median_ms / eager_ms, 3),
                         "ratio_to_onnxruntime": round(latency[name].median_ms / ort_ms, 3) if ort_ms else None,
                         "max_abs_err": float(f"{error:.3g}"), "compile_s": round(compile_s, 2)})
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
            ratios = [r[key] for r in rows if r["backend"] == backend and r["threads"] == 1 and "+" not in r["model"]
                      and r.get(key)]
            if ratios and backend != against:
                geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                print(f"geomean {backend} / {against} (1 thread, {len(ratios)} zoo models): {geo:.2f}")


def split_models(text: str) -> list[str]:
    """';'-separated specs; plain zoo names may also be ','-separated (pipelines contain commas)."""
    parts = text.split(";") if ";" in text or "+" in text else text.split(",")
    return [part.strip() for part in parts if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 thread, no tuning, fewer rounds")
    parser.add_argument("--models", default=";".join(MODELS + COMPRESSED),
                        help="';'-separated zoo names or NAME+PIPELINE")
    parser.add_argument("--tune-trials", type=int, default=64, help="MetaSchedule trials per model (0: no tvm-tuned)")
    parser.add_argument("--tuning-dir", help="keep tuning databases in DIR/<model> and reuse them")
    parser.add_argument("--batch", type=int, default=IMAGE_BATCH, help="batch of the image models")
    parser.add_argument("--json", help="write {'rows': [...]} here")
    args = parser.parse_args()
    threads = [1] if args.quick else [1, 2]
    trials = 0 if args.quick else args.tune_trials
    rows: list[dict] = []
    for name in split_models(args.models):
        print(f"== {name}", flush=True)
        rows += measure(name, threads, trials, rounds=3 if args.quick else 5, tuning_dir=args.tuning_dir,
                        batch=args.batch)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
