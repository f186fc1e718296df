"""What the benchmark scripts share: the aligned table they print, and thread-time medians.

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.table import print_rows, thread_ms
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


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
