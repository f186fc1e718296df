"""Wall-clock latency of a callable, robust to a noisy shared machine."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Latency:
    """Latency in milliseconds over `runs` timed calls."""

    median_ms: float
    min_ms: float
    runs: int


def measure_latency(fn: Callable[..., Any], inputs: tuple, *, warmup: int = 2, min_runs: int = 5,
                    max_runs: int = 200, budget_s: float = 1.0) -> Latency:
    """Call fn(*inputs) repeatedly (no grad) until `budget_s` or `max_runs`; report median and min."""
    times: list[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        deadline = time.perf_counter() + budget_s
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
            start = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - start) * 1e3)
    return Latency(median_ms=statistics.median(times), min_ms=min(times), runs=len(times))


def interleaved_latency(fns: dict[str, Callable[..., Any]], inputs: tuple, *, rounds: int = 5,
                        budget_s: float = 0.4, min_runs: int = 3, warmup: int = 1) -> dict[str, Latency]:
    """Time several callables in alternating rounds so machine noise hits them alike (each round:
    `warmup` untimed calls, then timed calls until `budget_s`, at least `min_runs`)."""
    samples: dict[str, list[Latency]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(measure_latency(fn, inputs, warmup=warmup, min_runs=min_runs, budget_s=budget_s))
    return {name: Latency(median_ms=statistics.median(s.median_ms for s in runs),
                          min_ms=min(s.min_ms for s in runs), runs=sum(s.runs for s in runs))
            for name, runs in samples.items()}
