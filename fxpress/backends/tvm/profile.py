"""Where a compiled TVM model spends its time: wall time per called function (kernel).

    from fxpress.backends.tvm.profile import profile_calls
    rows = profile_calls(compiled, inputs)   # slowest first
    rows[0]   # {'function': 'fused_matmul5_add3', 'calls': 6, 'ms': 3.1, 'share': 0.24}

TVM 0.27's Relax VM has no profiler; its instrument hook is called before and after every
call instruction, so each fused TIR function (and each VM builtin: allocations, reshapes) is
timed between the two.  A fresh VM over the same library and weights is used, so the
compiled model itself is not touched.  Times are wall clock per run of ``main`` (median
over `rounds` runs), including the hook's own overhead of about a microsecond a call: read
small kernels with that in mind.  MiniLM at batch 2 x 14 tokens showed this way that its
time is in the four dense matmuls of each layer (90%), not in layer norm, GELU or softmax.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from fxpress.errors import LoweringError


def profile_calls(compiled, inputs: tuple[torch.Tensor, ...], rounds: int = 10, warmup: int = 3) -> list[dict]:
    """Rows ``{function, calls, ms, share}`` per called function, slowest first.

    `compiled`: a CompiledModel from ``fxpress.backends.compile(graph, "llvm")``; `inputs` as it takes
    them.  ``ms`` is the function's time in one run of the model (all its calls), ``calls`` how many
    times one run calls it, ``share`` its part of the summed time.
    """
    import tvm
    from tvm import relax

    executable = getattr(compiled, "executable", compiled)
    if getattr(executable, "backend", None) != "tvm" or not hasattr(executable, "vm"):
        raise LoweringError("profile_calls needs a model compiled for a TVM target this machine runs "
                            f"(llvm), got {type(executable).__name__}; compile it with target='llvm'")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    vm = relax.VirtualMachine(executable.library, executable.device)
    args = [tvm.runtime.tensor(x.detach().contiguous().cpu().numpy(), executable.device) for x in inputs]
    for _ in range(warmup):
        vm["main"](*args, *executable.weights)
    per_run: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, int] = defaultdict(int)
    started: dict[str, int] = {}
    current: dict[str, float] = defaultdict(float)

    def instrument(_func, symbol, before, _result, *_args):
        if before:
            started[symbol] = time.perf_counter_ns()
        else:
            current[symbol] += (time.perf_counter_ns() - started[symbol]) / 1e6
            calls[symbol] += 1
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    for _ in range(rounds):
        current.clear()
        vm["main"](*args, *executable.weights)
        for symbol, ms in current.items():
            per_run[symbol].append(ms)
    medians = {symbol: statistics.median(times + [0.0] * (rounds - len(times))) for symbol, times in per_run.items()}
    total = sum(medians.values()) or 1.0
    rows = [{"function": symbol, "calls": calls[symbol] // rounds, "ms": round(ms, 4), "share": round(ms / total, 4)}
            for symbol, ms in medians.items()]
    return sorted(rows, key=lambda row: -row["ms"])


__all__ = ["profile_calls"]
