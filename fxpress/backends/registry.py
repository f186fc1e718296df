"""The backend registry: one :class:`Backend` per target family, looked up by target or by name.

    tvm     llvm, aarch64, c, cuda   Relax lowering + fxpress's rule table (fxpress/backends/tvm/)
    onnx    onnx                     torch.onnx export, run by onnxruntime (fxpress/backends/onnx.py)
    native  native                   binary and quantized layers on C kernels, the rest in PyTorch (backends/native/)

A backend builds a graph for one of its targets (``build(graph, target,
**options) -> Build``), loads a saved artifact (``load(folder, manifest,
params)``), names the versions a manifest records (``versions()``) and says
which ops it can lower (``can_lower(op, target)``).  ``fxpress.compile`` and
``fxpress.load`` go through :func:`backend_for_target` / :func:`get_backend`.

:func:`register_lowering_targets` puts one LoweringTarget per target into
the passes layer's registry (:mod:`fxpress.passes.infra.targets`), so a
pipeline can be checked against a target before anything runs.  It is the
one place that registration happens; ``fxpress.backends`` calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fxpress.backends.targets import TargetSpec, get_target, register_target
from fxpress.errors import ArtifactError, LoweringError
from fxpress.ir import Graph
from fxpress.ir.opinfo import op_qualname
from fxpress.passes.infra.targets import register_lowering_target

BUILTIN_NAMESPACES = ("aten", "prims")


@dataclass
class Build:
    """What a backend's build gives: the executable (``run``, ``params``, ``write_library``), its input
    signature, how its flat tensors map to the model's inputs and outputs (an IOStructure), and
    backend extras for the manifest's ``info`` (compile times, tuning)."""

    executable: Any
    inputs: list
    structure: Any
    info: dict = field(default_factory=dict)


def is_builtin(op: Any) -> bool:
    """An ATen / prims op (which importers handle), not one a pass inserts."""
    return op_qualname(op).partition("::")[0] in BUILTIN_NAMESPACES


def _base_versions() -> dict[str, str]:
    import torch

    import fxpress

    return {"fxpress": fxpress.__version__, "torch": torch.__version__.split("+")[0]}


class Backend:
    """A target family.  Subclasses set ``name`` and ``targets`` and implement the four methods."""

    name: str = "backend"
    targets: tuple[str, ...] = ()
    # Higher-order ops (torch.cond, map, while_loop) it lowers, by name; None: all of them.
    higher_order: tuple[str, ...] | None = ()
    higher_order_fix = "compile for target 'native', which runs it in PyTorch"

    def check(self, graph: Graph) -> None:
        """LoweringError, before anything is built, for what this backend cannot compile (one line)."""
        from fxpress.backends.preflight import check_compilable

        check_compilable(graph, self.name, self.higher_order, self.higher_order_fix)

    def build(self, graph: Graph, target: str, **options: Any) -> Build:
        raise NotImplementedError

    def load(self, folder: Path, manifest: dict, params: dict[str, np.ndarray]) -> Any:
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        return _base_versions()

    def can_lower(self, op: Any, target: str | None = None) -> bool:
        """Whether `op` can be lowered for `target` (None: for some target of this backend)."""
        raise NotImplementedError


class TVMBackend(Backend):
    """Apache TVM Relax: ATen through TVM's importer, fxpress ops through the rule table."""

    name = "tvm"
    targets = ("llvm", "aarch64", "c", "cuda")
    higher_order = ("cond",)  # TVM's importer makes relax.If of it

    def build(self, graph: Graph, target: str, *, dynamic: bool = False, tune_trials: int = 0,
              tuning_dir: str | Path | None = None, schedule: bool = True,
              dump_ir: str | Path | None = None, rpc: str | None = None, rpc_key: str | None = None,
              max_sizes: int | dict[str, int] | None = None) -> Build:
        from fxpress.backends.tvm import prepare_runtime
        from fxpress.backends.tvm.driver import build_tvm

        prepare_runtime()
        executable, inputs, structure, info = build_tvm(graph, get_target(target), dynamic=dynamic,
                                                        tune_trials=tune_trials, tuning_dir=tuning_dir,
                                                        schedule=schedule, dump_ir=dump_ir, rpc=rpc,
                                                        rpc_key=rpc_key, max_sizes=max_sizes)
        return Build(executable, inputs, structure, info)

    def load(self, folder: Path, manifest: dict, params: dict[str, np.ndarray]) -> Any:
        from fxpress.backends.tvm import prepare_runtime
        from fxpress.backends.tvm.build import load_from_manifest

        prepare_runtime()
        return load_from_manifest(folder, manifest, params)

    def versions(self) -> dict[str, str]:
        import tvm

        return _base_versions() | {"tvm": tvm.__version__}

    def can_lower(self, op: Any, target: str | None = None) -> bool:
        from fxpress.backends.tvm import load_rules, rule_targets
        from fxpress.backends.tvm.rules import rule_for

        if is_builtin(op):
            return True  # TVM's importer; an ATen op it lacks fails at lowering, naming the node
        load_rules()
        rule = rule_for(op)
        if rule is None:
            return False
        allowed = rule_targets(rule)
        return allowed is None or target is None or target in allowed


class OnnxBackend(Backend):
    """ONNX Runtime on the host CPU: ATen only; ONNX has no form of the ops passes insert."""

    name = "onnx"
    targets = ("onnx",)
    higher_order = ("cond",)  # torch.onnx makes an If of it

    def build(self, graph: Graph, target: str, *, dynamic: bool = False, **options: Any) -> Build:
        from fxpress.backends.onnx import build_onnx

        _no_options(self.name, options)
        executable, inputs, structure = build_onnx(graph, dynamic=dynamic)
        return Build(executable, inputs, structure)

    def load(self, folder: Path, manifest: dict, params: dict[str, np.ndarray]) -> Any:
        from fxpress.backends.onnx import load_from_manifest

        return load_from_manifest(folder, manifest, params)

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return _base_versions() | {"onnxruntime": onnxruntime.__version__}

    def can_lower(self, op: Any, target: str | None = None) -> bool:
        return is_builtin(op)


class NativeBackend(Backend):
    """The native C kernels for the binary ops and quantized linears; sparse_linear runs eagerly on its own C
    kernel; every other op (quantized embeddings too) runs in PyTorch."""

    name = "native"
    targets = ("native",)
    higher_order = None  # everything but the binary layers runs in PyTorch

    def build(self, graph: Graph, target: str, *, dynamic: bool = False, **options: Any) -> Build:
        from fxpress.backends.native.executable import build_native

        _no_options(self.name, options)
        executable, inputs, structure = build_native(graph, dynamic=dynamic)
        info: dict[str, Any] = {"native_layers": executable.lowered}
        if executable.quantized_kernels:
            info["quantized_kernels"] = executable.quantized_kernels
        return Build(executable, inputs, structure, info)

    def load(self, folder: Path, manifest: dict, params: dict[str, np.ndarray]) -> Any:
        from fxpress.backends.native.executable import load_from_manifest

        return load_from_manifest(folder, manifest, params)

    def can_lower(self, op: Any, target: str | None = None) -> bool:
        from fxpress.ops.binary import BINARY_OPS
        from fxpress.ops.quant import QUANTIZED_OPS
        from fxpress.ops.sparse import SPARSE_LINEAR

        # quantized_linear: the quantized kernels or its reference (native/quant_lowering.py);
        # quantized_embedding: its reference in PyTorch
        native = {op_qualname(kernel_op) for kernel_op in (*BINARY_OPS, SPARSE_LINEAR, *QUANTIZED_OPS)}
        return is_builtin(op) or op_qualname(op) in native


def _no_options(backend: str, options: dict) -> None:
    given = [name for name, value in options.items() if value not in (None, 0, True)]
    if given:
        raise LoweringError(f"options {', '.join(given)} apply to TVM targets only, not to the {backend} backend")


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The backend a manifest names; ArtifactError for one this fxpress does not know."""
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ArtifactError(f"manifest names unknown backend {name!r}; expected one of {', '.join(_BACKENDS)}")
    return backend


def backend_for_target(target: str) -> Backend:
    """The backend that builds `target`; LoweringError naming the known targets."""
    return _BACKENDS[get_target(target).backend]


def registered_backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


@dataclass(frozen=True)
class TargetLowering:
    """One target as the passes layer sees it (a LoweringTarget): its backend's can_lower for it."""

    name: str
    backend: Backend

    def can_lower(self, op: Any) -> bool:
        return self.backend.can_lower(op, self.name)


def _native_target() -> TargetSpec:
    return TargetSpec("native", "native", "binary and quantized layers on C kernels, the rest in PyTorch (host CPU)",
                      library="json")


def register_lowering_targets() -> None:
    """Register the built-in backends, the native target, and every target with the passes layer."""
    register_target(_native_target())
    for backend in (TVMBackend(), OnnxBackend(), NativeBackend()):
        register_backend(backend)
        for target in backend.targets:
            register_lowering_target(TargetLowering(target, backend))


__all__ = ["Backend", "Build", "NativeBackend", "OnnxBackend", "TVMBackend", "TargetLowering",
           "backend_for_target", "get_backend", "is_builtin", "register_backend", "register_lowering_targets",
           "registered_backends"]
