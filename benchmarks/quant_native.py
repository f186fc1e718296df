"""Batch-1, one-token forward at 1 thread: eager fp32 vs eager int4 (the op's reference) vs native int4.

    python benchmarks/quant_native.py --quick --json /tmp/quant_native.json     # tiny LLaMA (random, 4 layers)
    python benchmarks/quant_native.py --model smollm2 --json /tmp/smollm2.json  # SmolLM2-135M (zoo)

A one-position forward is the proxy of a decode step (no KV cache here).  Rows: model, pipeline,
fp32_ms, int4_eager_ms, int4_native_ms, speedup (fp32 / native), kernels (layers per kernel).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

import fxpress
from fxpress.passes import PassContext, PassManager
from fxpress.utils.timing import measure_latency


def load(name: str) -> tuple[torch.nn.Module, tuple]:
    if name == "tiny-llama":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from model_factories import tiny_llama

        return tiny_llama(layers=4), (torch.zeros(1, 1, dtype=torch.long),)
    from fxpress.zoo import load_model

    model = load_model(name)
    return model.module, (torch.zeros(1, 1, dtype=torch.long),)


def measure(name: str, pipeline: str, budget_s: float) -> dict:
    module, inputs = load(name)
    graph = fxpress.capture(module, inputs)
    quantized = PassManager(pipeline).run(graph, PassContext()).graph
    compiled = fxpress.compile(quantized, "native")
    kernels = Counter(kernel.split(" ")[0] for kernel in compiled.info["quantized_kernels"].values())
    times = {label: measure_latency(run, inputs, budget_s=budget_s).median_ms
             for label, run in (("fp32_ms", graph), ("int4_eager_ms", quantized), ("int4_native_ms", compiled))}
    return {"model": name, "pipeline": pipeline, **{k: round(v, 3) for k, v in times.items()},
            "speedup": round(times["fp32_ms"] / times["int4_native_ms"], 2), "kernels": dict(kernels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama, or a zoo LLM (smollm2)")
    parser.add_argument("--pipeline", default="quantize{bits=4,group=32,zero=int}")
    parser.add_argument("--quick", action="store_true", help="0.5 s of timing per row instead of 3 s")
    parser.add_argument("--json", type=Path, help="write the row here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    row = measure(args.model, args.pipeline, 0.5 if args.quick else 3.0)
    print(" | ".join(f"{key}={value}" for key, value in row.items()))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
