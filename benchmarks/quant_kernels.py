"""Per-linear latency of the quantized CPU kernels (fxpress/ops/native_quant.py) against fp32 torch, 1 thread.

    python benchmarks/quant_kernels.py [--quick] [--json PATH]

Shapes (out x in): SmolLM2-135M's linears (576x576 q/o, 192x576 k/v is left out as the smallest, 1536x576
gate/up, 576x1536 down, 49152x576 the vocabulary head) and a 4096x4096 square.  Kernels: fp32 F.linear
(MKL, the baseline), the native int4 x int8 kernel (int zero points, group 32 and, where K allows, 128),
the native int8 x int8 kernel (at batch 64 `Int8Linear` takes oneDNN's int8 GEMM, `torch._int_mm`: level
".../onednn"), the native codebook kernel (group 32), and torch's int8 weight-only
`aten._weight_int8pack_mm` as a peer.  Each row gives the latency at batch 1 (decode) and batch 64 as a
ratio to fp32 (lower is faster; 0.5 = twice as fast).

Timing: thread CPU time of a block of back-to-back calls (sized to ~20-50 ms) divided by its calls, one block
per kernel per round, rounds interleaved across the kernels (so machine noise hits them alike), and the
median over rounds.  The machine these numbers come
from is shared: read ratios, not absolute times, and expect a few percent of jitter.  The Python call
overhead of every kernel is included: the native ones are bound to their weights once (`Int4Linear` etc.,
as a compiled graph holds them), so a call pays the check of x, the output allocation and ctypes.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fxpress.ops import native_quant as nq

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096)]
BATCHES = (1, 64)


def kernels(weight: torch.Tensor) -> dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """name -> (level, x -> y) for one weight."""
    n, k = weight.shape
    level = nq.simd_level()
    found: dict[str, tuple[str, Callable]] = {"fp32 F.linear": ("mkl", lambda x: F.linear(x, weight))}
    for group in (32, 128):
        if k % group == 0:
            p = nq.pack_rtn_int4(weight, group, "int")
            found[f"int4 g{group} int-zero"] = (level, nq.Int4Linear(p.codes, p.scales, p.zeros, None, group, "int"))
    wq, wscale = nq.pack_int8(weight)
    int8 = nq.Int8Linear(wq, wscale, None)
    found["int8 x int8"] = (level + ("/onednn" if int8.uses_gemm(64) else ""), int8)  # b64: torch._int_mm
    codebook = torch.linspace(0, 1, 16) ** 1.5
    c = nq.pack_codebook(weight, codebook, 32)
    found["codebook g32"] = (level if level != "avx512vnni" else "avx2",
                             nq.CodebookLinear(c.codes, c.scales, c.zeros, codebook, None, 32))
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        found["torch int8 weight-only"] = ("aten", lambda x: torch.ops.aten._weight_int8pack_mm(x, wq, wscale))
    return found


def _block_ms(fn: Callable, x: torch.Tensor, calls: int) -> float:
    """Thread CPU time per call of `calls` back-to-back calls, in ms (timed as one block: reading the
    thread clock is a system call that costs microseconds here, too much to pay on every call)."""
    start = time.thread_time()
    for _ in range(calls):
        fn(x)
    return (time.thread_time() - start) * 1e3 / calls


def measure(fns: dict[str, Callable], x: torch.Tensor, rounds: int, block_s: float) -> dict[str, float]:
    """Median over interleaved rounds (every kernel one block per round) of each kernel's per-call latency (ms)."""
    calls = {}
    for name, fn in fns.items():
        fn(x)
        calls[name] = max(1, min(2000, int(block_s / max(_block_ms(fn, x, 3) / 1e3, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_block_ms(fn, x, calls[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def run(shapes: list[tuple[int, int]], rounds: int, block_s: float) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for n, k in shapes:
        weight = torch.randn(n, k, generator=generator) * 0.05
        found = kernels(weight)
        fns = {name: fn for name, (_, fn) in found.items()}
        ms = {b: measure(fns, torch.randn(b, k, generator=generator), rounds, block_s) for b in BATCHES}
        for name, (level, _) in found.items():
            rows.append({"shape": f"{n}x{k}", "kernel": name, "level": level,
                         "latency_b1_ms": round(ms[1][name], 4), "latency_b64_ms": round(ms[64][name], 3),
                         "latency_b1_ratio": round(ms[1][name] / ms[1]["fp32 F.linear"], 3),
                         "latency_b64_ratio": round(ms[64][name] / ms[64]["fp32 F.linear"], 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds, no 4096x4096")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = SHAPES[:-1] if args.quick else SHAPES
    rows = run(shapes, rounds=5 if args.quick else 11, block_s=0.02 if args.quick else 0.05)
    print(f"{'shape':<11}{'kernel':<24}{'level':<8}{'b1 ms':>9}{'b1 ratio':>10}{'b64 ms':>10}{'b64 ratio':>11}")
    for row in rows:
        print(f"{row['shape']:<11}{row['kernel']:<24}{row['level']:<8}{row['latency_b1_ms']:>9.3f}"
              f"{row['latency_b1_ratio']:>10.2f}{row['latency_b64_ms']:>10.2f}{row['latency_b64_ratio']:>11.2f}")
    if args.json:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        Path(args.json).write_text(json.dumps({"cpu": cpu, "threads": 1, "simd_level": nq.simd_level(),
                                               "quick": args.quick, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
