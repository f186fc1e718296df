"""Compilation targets by name: ``llvm`` (host CPU), ``aarch64``, ``cuda``, ``c``, ``onnx``.

A :class:`TargetSpec` says which backend builds for a target and, for TVM,
how to make the ``tvm.target.Target`` (as a JSON dict: TVM 0.27 no longer
parses ``"llvm -mcpu=..."`` strings) and how to package the library.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Callable

from fxpress.errors import LoweringError


@dataclass(frozen=True)
class TargetSpec:
    """`backend` is "tvm" or "onnx"; `library` is the file format ("so" or "tar" of objects)."""

    name: str
    backend: str
    description: str
    tvm_target: Callable[[], dict] | None = None
    library: str = "so"
    runs_on_host: Callable[[], bool] = lambda: True


def host_cpu_target() -> dict:
    """The host CPU with its ISA detected by LLVM (e.g. mcpu=emeraldrapids: AVX-512).

    LLVM's server-CPU tuning prefers 256-bit vectors; our schedules size their register
    tiles for the full width (``vector_lanes``), and on AVX-512 the 512-bit code runs the
    dense matmuls about 1.7x faster here, so the preference is turned off.
    """
    import tvm
    from tvm.target import codegen

    cpu = str(codegen.llvm_get_system_cpu())
    target = {"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1}
    if codegen.llvm_cpu_has_features(["avx512f"], tvm.target.Target({"kind": "llvm", "mcpu": cpu})):
        target["mattr"] = ["-prefer-256-bit"]
    return target


def aarch64_target() -> dict:
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def cuda_target() -> dict:
    """sm_80 unless ``FXPRESS_CUDA_ARCH`` names the GPU's (e.g. sm_90; scripts/gpu_check.sh sets it)."""
    return {"kind": "cuda", "arch": os.environ.get("FXPRESS_CUDA_ARCH", "sm_80"), "host": {"kind": "llvm"}}


def c_target() -> dict:
    return {"kind": "c"}


def _has_cuda() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no driver, no device
        return False


_TARGETS: dict[str, TargetSpec] = {}


def register_target(spec: TargetSpec) -> TargetSpec:
    _TARGETS[spec.name] = spec
    return spec


register_target(TargetSpec("llvm", "tvm", "host CPU via TVM/LLVM, ISA detected", host_cpu_target))
register_target(TargetSpec("aarch64", "tvm", "64-bit Arm Linux (NEON), cross-compiled objects (tar)",
                           aarch64_target, library="tar",
                           runs_on_host=lambda: platform.machine() in ("aarch64", "arm64")))
register_target(TargetSpec("cuda", "tvm", "NVIDIA GPU (sm_80+) via TVM, dlight GPU schedules", cuda_target,
                           runs_on_host=_has_cuda))
register_target(TargetSpec("c", "tvm", "C source via TVM, compiled by the host C compiler (no schedules)",
                           c_target))
register_target(TargetSpec("onnx", "onnx", "ONNX Runtime on the host CPU"))


def available_targets() -> dict[str, str]:
    """Target name -> description."""
    return {name: spec.description for name, spec in sorted(_TARGETS.items())}


def get_target(name: str) -> TargetSpec:
    spec = _TARGETS.get(name)
    if spec is None:
        raise LoweringError(f"unknown target {name!r}; available: {', '.join(sorted(_TARGETS))}")
    return spec
