"""What the benchmark scripts share: run set-up, the aligned table they print, and thread-time medians.

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.table import print_rows, start_run, thread_ms
"""
from __future__ import annotations

import logging
import statistics
import sys
import time
from typing import Any, Callable

import torch


def start_run(log: logging.Logger, threads: int = 1) -> None:
    """Progress lines from `log` on stderr with a clock, `threads` torch threads, seed 0."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def print_rows(rows: list[dict], fields: list[str], fmt: Callable[[Any], str]) -> None:
    """`rows` as right-aligned columns `fields` (a header, a rule, a line per row), values through `fmt`."""
    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in fields}
    print("  ".join(f"{c:>{widths[c]}}" for c in fields))
    print("  ".join("-" * widths[c] for c in fields))
    for r in rows:
        print("  ".join(f"{fmt(r[c]):>{widths[c]}}" for c in fields))


def thread_ms(fn: Callable, inputs: tuple, calls: int) -> float:
    """Median thread CPU time of `calls` calls of ``fn(*inputs)``, in ms (steadier than wall time under load)."""
    times = []
    for _ in range(calls):
        start = time.thread_time()
        fn(*inputs)
        times.append((time.thread_time() - start) * 1e3)
    return statistics.median(times)
