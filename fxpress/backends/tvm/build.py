"""Compile a lowered Relax module with ``tvm.compile`` and run it with the Relax VM.

:class:`TVMExecutable` is what a CompiledModel holds for the TVM targets:
it calls ``main_transform_params`` once on the raw parameters, then
``main(*inputs, *transformed)`` per call, passing torch tensors through
DLPack without copies.  Libraries for the host are shared objects; for
aarch64 (no cross linker here) a tar of ELF objects that TVM links on the
board when it loads it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from fxpress.backends.targets import TargetSpec
from fxpress.backends.tvm.lowering import Lowered
from fxpress.errors import ArtifactError, LoweringError

log = logging.getLogger(__name__)

TRANSFORM_FN = "main_transform_params"


def make_target(spec: TargetSpec):
    import tvm

    return tvm.target.Target(spec.tvm_target())


def compile_relax(lowered: Lowered, spec: TargetSpec, *, database_dir: str | None = None,
                  schedule: bool = True, dump_ir: str | Path | None = None,
                  upper_bounds: dict[str, int] | None = None):
    """``tvm.compile`` with fxpress's pipeline; returns (VMExecutable, seconds).  dump_ir: a folder for
    the module as TVMScript after fusion and after scheduling; upper_bounds: {TIR variable: its largest
    value} for memory planning (:func:`.pipeline.build_pipeline`)."""
    import tvm

    from fxpress.backends.tvm.pipeline import build_pipeline

    target = make_target(spec)
    start = time.perf_counter()
    try:
        executable = tvm.compile(lowered.mod, target,
                                 relax_pipeline=build_pipeline(target, database_dir=database_dir,
                                                               schedule=schedule, dump_dir=dump_ir,
                                                               upper_bounds=upper_bounds),
                                 tir_pipeline="fxpress")
    except Exception as err:  # noqa: BLE001 - TVM raises many kinds
        raise LoweringError(f"TVM failed to compile for {spec.name}: {type(err).__name__}: "
                            f"{str(err).strip().splitlines()[-1][:400]}") from err
    seconds = time.perf_counter() - start
    log.info("compiled for %s in %.1f s", spec.name, seconds)
    return executable, seconds


def set_threads(threads: int) -> None:
    """Size TVM's CPU thread pool (it is process-wide, like torch's)."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, int(threads))


class TVMExecutable:
    """A compiled TVM library plus its parameters, callable on torch tensors."""

    backend = "tvm"

    def __init__(self, library, params: dict[str, np.ndarray], param_names: list[str], device: str = "cpu"):
        import tvm
        from tvm import relax

        self.library = library
        self.params = params
        self.param_names = list(param_names)
        self.device = tvm.cpu() if device == "cpu" else tvm.cuda(0)
        self.vm = relax.VirtualMachine(library, self.device)
        raw = [tvm.runtime.tensor(params[name], self.device) for name in self.param_names]
        if self.param_names and self._has_function(TRANSFORM_FN):
            self.weights = list(self.vm[TRANSFORM_FN](raw))
        else:
            self.weights = raw
        self.main = self.vm["main"]
        if device == "cpu":
            set_threads(torch.get_num_threads())

    def _has_function(self, name: str) -> bool:
        try:
            self.vm[name]
        except Exception:  # noqa: BLE001 - the VM raises when a function is missing
            return False
        return True

    def set_threads(self, threads: int) -> None:
        set_threads(threads)

    def run(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        result = self.main(*[x.contiguous() for x in inputs], *self.weights)
        outputs = [result] if hasattr(result, "shape") else list(result)
        return [torch.from_dlpack(out) for out in outputs]

    def write_library(self, folder: Path, stem: str, fmt: str) -> str:
        """Export the library as `stem.so` or `stem.tar`; returns the file name."""
        name = f"{stem}.{fmt}"
        self.library.export_library(str(folder / name))
        return name


class UnloadedTVMExecutable(TVMExecutable):
    """A library built for another machine (aarch64 on x86, cuda without a GPU): save-only."""

    def __init__(self, library, params: dict[str, np.ndarray], param_names: list[str], target: str):
        self.library, self.params, self.param_names, self.target = library, params, list(param_names), target

    def run(self, inputs):
        raise ArtifactError(f"this model was compiled for {self.target}, which this machine cannot run; "
                            f"save it and load it on a {self.target} machine")


def build_executable(lowered: Lowered, spec: TargetSpec, *, database_dir: str | None = None,
                     schedule: bool = True, dump_ir: str | Path | None = None,
                     upper_bounds: dict[str, int] | None = None):
    """Compile and wrap; returns (executable, compile seconds)."""
    library, seconds = compile_relax(lowered, spec, database_dir=database_dir, schedule=schedule,
                                     dump_ir=dump_ir, upper_bounds=upper_bounds)
    if not spec.runs_on_host():
        return UnloadedTVMExecutable(library, lowered.params, lowered.param_names, spec.name), seconds
    device = "cuda" if spec.name == "cuda" else "cpu"
    return TVMExecutable(library, lowered.params, lowered.param_names, device), seconds


def load_executable(path: Path, params: dict[str, np.ndarray], param_names: list[str], spec: TargetSpec):
    """Load a saved library; refuse one this machine cannot run."""
    import tvm

    if not spec.runs_on_host():
        raise ArtifactError(f"{path.parent} was compiled for {spec.name}, which this machine cannot run")
    try:
        library = tvm.runtime.load_module(str(path))
    except Exception as err:  # noqa: BLE001
        raise ArtifactError(f"cannot load compiled library {path}: {str(err).strip().splitlines()[-1]}") from err
    return TVMExecutable(library, params, param_names, "cuda" if spec.name == "cuda" else "cpu")


def load_from_manifest(folder: Path, manifest: dict, params: dict[str, np.ndarray]) -> TVMExecutable:
    from fxpress.backends.targets import get_target

    try:
        spec = get_target(manifest["target"])
    except LoweringError as err:
        raise ArtifactError(f"manifest of {folder} names an unknown target: {err}") from err
    return load_executable(folder / manifest["library"], params, list(manifest["param_names"]), spec)
