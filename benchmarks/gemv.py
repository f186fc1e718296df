"""Batch-1 fp32 matrix-vector products (a linear at decode): torch vs TVM without and with the GEMV rule.

    python benchmarks/gemv.py [--quick] [--shapes 576x1536,576x49152] [--json PATH]

Each shape ``KxN`` is ``nn.Linear(K, N, bias=False)`` on x of shape (1, 1, K), captured and
compiled for llvm twice in this run: ``tvm_before`` with the single-row matmul rule and its weight
packing off (``build_pipeline(gemv=False)``: the other default schedules, which leave these matmuls
as naive loops), ``tvm`` with both on.  One thread (torch and TVM), timed by the calling thread's
CPU time in interleaved rounds (the median round).  ``ratio`` is tvm / torch (< 1: TVM faster),
``before_ratio`` tvm_before / torch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

SHAPES = ("576x1536", "1536x576", "576x576", "576x49152", "4096x4096")
QUICK_SHAPES = ("576x1536", "1536x576", "576x49152")


def compile_linear(graph, gemv: bool):
    """The graph compiled for llvm with fxpress's pipeline, the GEMV rule on or off."""
    import tvm

    from fxpress.backends.targets import get_target
    from fxpress.backends.tvm.build import TVMExecutable, make_target
    from fxpress.backends.tvm.lowering import to_relax
    from fxpress.backends.tvm.pipeline import build_pipeline

    lowered = to_relax(graph)
    target = make_target(get_target("llvm"))
    library = tvm.compile(lowered.mod, target, relax_pipeline=build_pipeline(target, gemv=gemv))
    executable = TVMExecutable(library, lowered.params, lowered.param_names)
    return lambda x: executable.run((x,))[0]


def cpu_ms(fn: Callable, x, budget_s: float) -> float:
    """Thread CPU milliseconds per call, over as many calls as fit in `budget_s` (at least 3)."""
    fn(x)
    calls, start, wall = 0, time.thread_time(), time.perf_counter()
    while calls < 3 or time.perf_counter() - wall < budget_s:
        fn(x)
        calls += 1
    return (time.thread_time() - start) / calls * 1e3


def measure(shape: str, rounds: int, budget_s: float) -> dict:
    import torch

    from fxpress.ir import capture

    depth, columns = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    linear = torch.nn.Linear(depth, columns, bias=False).eval()
    x = torch.randn(1, 1, depth)
    graph = capture(linear, (x,), name=f"linear-{shape}")
    fns = {"torch": linear, "tvm_before": compile_linear(graph, gemv=False), "tvm": compile_linear(graph, gemv=True)}
    with torch.no_grad():
        expected = linear(x)
        error = max((fns[name](x) - expected).abs().max().item() for name in ("tvm_before", "tvm"))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name].append(cpu_ms(fn, x, budget_s))
    ms = {name: statistics.median(values) for name, values in samples.items()}
    return {"shape": shape, "torch_ms": round(ms["torch"], 4), "tvm_before_ms": round(ms["tvm_before"], 4),
            "tvm_ms": round(ms["tvm"], 4), "ratio": round(ms["tvm"] / ms["torch"], 3),
            "before_ratio": round(ms["tvm_before"] / ms["torch"], 3), "max_abs_err": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"shapes {', '.join(QUICK_SHAPES)}, fewer rounds")
    parser.add_argument("--shapes", help="comma-separated KxN (input x output features)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    shapes = args.shapes.split(",") if args.shapes else QUICK_SHAPES if args.quick else SHAPES
    rounds, budget_s = (3, 0.15) if args.quick else (7, 0.3)
    rows = []
    print(f"{'shape':<11}{'torch_ms':>10}{'tvm_before_ms':>15}{'tvm_ms':>10}{'ratio':>8}{'before':>8}{'max_err':>10}")
    for shape in shapes:
        row = measure(shape, rounds, budget_s)
        rows.append(row)
        print(f"{shape:<11}{row['torch_ms']:>10.4f}{row['tvm_before_ms']:>15.4f}{row['tvm_ms']:>10.4f}"
              f"{row['ratio']:>8.2f}{row['before_ratio']:>8.2f}{row['max_abs_err']:>10.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": 1, "timer": "thread CPU time, median of interleaved rounds", "rows": rows},
                      handle, indent=2)


if __name__ == "__main__":
    main()
