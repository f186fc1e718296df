"""Compile every zoo model for `cuda`, run it on the GPU, compare with eager PyTorch, time both.

    scripts/gpu_check.sh [--json PATH] [--models vit-mnist,cnn-digits] [--rounds 5]

Without a GPU visible to TVM it prints why (TVM's answer and nvidia-smi's) and exits 0 having
compiled nothing.  With one, the target's arch follows the device (``FXPRESS_CUDA_ARCH=sm_XY`` from
its compute capability), and each model is captured as `fxpress run` captures it, compiled, run on
its example inputs and compared with the eager model on the CPU: rows model, status, compile_s,
max_abs_error, error_ratio (to the largest eager output), eager_cpu_ms, cuda_ms (median wall time of
`--rounds` calls; a call copies the inputs in and the outputs out, so it includes the transfers).
A model whose graph cannot be lowered for cuda (the binary ops' CPU-only schedules) is a row with
its refusal, not a failure.  Exit status 1 when a compiled model disagrees with eager beyond 1e-3
of its largest output.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("vit-mnist", "cnn-digits", "bnn-digits", "gdnet-lite", "minilm", "smollm2")
TOLERANCE = 1e-3


def gpu_or_reason() -> tuple[bool, str]:
    """(True, "sm_XY device name") when TVM sees a CUDA device, else (False, why)."""
    import tvm

    smi = shutil.which("nvidia-smi")
    smi_text = "nvidia-smi not found"
    if smi:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        smi_text = (done.stdout or done.stderr).strip() or f"nvidia-smi exited {done.returncode}"
    try:
        device = tvm.cuda(0)
        present = bool(device.exist)
    except Exception as err:  # noqa: BLE001 - no driver or no CUDA runtime in this TVM build
        return False, f"TVM cannot open a CUDA device ({type(err).__name__}: {err}); {smi_text}"
    if not present:
        return False, f"TVM sees no CUDA device (tvm.cuda(0).exist is False); {smi_text}"
    arch = "sm_" + str(device.compute_version).replace(".", "")
    return True, f"{arch} {device.device_name}"


def median_ms(fn, inputs, rounds: int) -> float:
    fn(*inputs)  # warm up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def first(output):
    import torch

    while isinstance(output, (tuple, list)):
        output = output[0]
    return output if isinstance(output, torch.Tensor) else torch.as_tensor(output)


def check(name: str, rounds: int) -> dict:
    import torch

    import fxpress
    from fxpress.errors import FxpressError
    from fxpress.recipes.run import capture_model
    from fxpress.zoo import load_model

    model = load_model(name)
    graph = capture_model(model)
    inputs = tuple(model.example_inputs)
    with torch.no_grad():
        expected = first(model.module(*inputs)).float()
    row = {"model": name, "eager_cpu_ms": round(median_ms(model.module, inputs, rounds), 3)}
    started = time.perf_counter()
    try:
        compiled = fxpress.compile(graph, "cuda")
    except FxpressError as err:
        return {**row, "status": f"refused: {err}"}
    row["compile_s"] = round(time.perf_counter() - started, 1)
    got = first(compiled(*inputs)).float().cpu()
    error = float((got - expected).abs().max())
    ratio = error / max(float(expected.abs().max()), 1e-12)
    row.update(status="ok" if ratio <= TOLERANCE else "MISMATCH", max_abs_error=error, error_ratio=ratio,
               cuda_ms=round(median_ms(compiled, inputs, rounds), 3))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of zoo models")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args()
    present, detail = gpu_or_reason()
    if not present:
        print(f"gpu_check: no GPU here, nothing compiled: {detail}")
        if args.json:
            args.json.write_text(json.dumps({"gpu": None, "reason": detail, "rows": []}, indent=2))
        return 0
    os.environ["FXPRESS_CUDA_ARCH"] = detail.split()[0]
    import torch

    torch.set_num_threads(1)
    print(f"gpu_check: {detail}")
    rows = []
    for name in args.models.split(","):
        row = check(name, args.rounds)
        rows.append(row)
        print(" | ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"gpu": detail, "rows": rows}, indent=2))
    return 1 if any(row["status"] == "MISMATCH" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
