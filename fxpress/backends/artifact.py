"""Compiled models and their saved form: a folder, never a pickle.

    model/
      manifest.json       format, versions, target, input signature, sha256 and bytes of every file,
                          and (native) each quantized layer: bits, group, zero kind, shapes, plane names
      params.safetensors  the parameters, by name; a quantized weight as its planes in their own dtypes
      model.so            the compiled library (model.tar for cross targets, model.onnx for onnx,
                          model.json for native: torch.export's graph schema)

``CompiledModel.save(dir)`` writes it; ``CompiledModel.load(dir)`` checks
the manifest, every file's hash and the versions before it loads anything,
and raises ArtifactError naming what is wrong (for a quantized plane: the layer and
the plane).  Calls are checked against
the input signature (expected vs got).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxpress.backends.signature import TensorSpec, check_inputs, torch_dtype
from fxpress.backends.structure import IOStructure
from fxpress.errors import FxpressError, LoweringError
from fxpress.utils.timing import Latency, measure_latency

log = logging.getLogger(__name__)

FORMAT = "fxpress-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def saved_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes of each file of a saved model as it lies on disk (what `du -b` counts)."""
    return {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir()) if p.is_file()}


def versions(backend: str) -> dict[str, str]:
    """Versions recorded in (and checked against) a manifest: fxpress, torch and the backend's own."""
    from fxpress.backends.registry import get_backend

    return get_backend(backend).versions()


@dataclass
class CompiledModel:
    """A model compiled for a target: call it on torch tensors, save it, time it.

    ``executable`` is the backend's runner (TVMExecutable, OnnxExecutable, NativeExecutable):
    ``run(inputs) -> list[Tensor]``, ``params``, ``write_library(folder, stem, fmt)``.
    """

    executable: Any
    inputs: list[TensorSpec]  # the tensor leaves of the arguments
    target: str
    name: str = "model"
    info: dict = field(default_factory=dict)  # compile_s, backend extras; saved in the manifest
    structure: IOStructure | None = None  # None: tensors in, one tensor or a tuple out, unchecked

    @property
    def backend(self) -> str:
        return self.executable.backend

    def __call__(self, *inputs: Any) -> Any:
        """Run on the eager model's arguments (tensors, or the lists, dicts and constants it was captured
        with); return its result's structure.  Inputs and outputs are checked against the signature."""
        if self.structure is None:
            check_inputs(self.inputs, inputs)
            outputs = self._run(tuple(inputs))
            return outputs[0] if len(outputs) == 1 else tuple(outputs)
        tensors = self.structure.flatten(inputs)
        check_inputs(self.inputs, tensors)
        return self.structure.restore(self._run(tensors), self.backend)

    def _run(self, tensors: tuple) -> list[torch.Tensor]:
        """The executable's outputs; a failure inside the backend's runtime is a one-line LoweringError."""
        try:
            return self.executable.run(tensors)
        except FxpressError:
            raise
        except Exception as err:  # noqa: BLE001 - each runtime raises its own kinds
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise LoweringError(f"{self.name} compiled for {self.target} failed in the {self.backend} runtime: "
                                f"{type(err).__name__}: {(lines[-1] if lines else '')[:400]}; compile for "
                                f"another target meanwhile, and report it") from err

    def example_inputs(self) -> tuple[Any, ...]:
        """Arguments that fit the signature: random floats, ones for integer inputs (ids, masks)."""
        generator = torch.Generator().manual_seed(0)
        made = []
        for spec in self.inputs:
            dtype = torch_dtype(spec.dtype)
            if dtype.is_floating_point:
                made.append(torch.randn(spec.shape, generator=generator).to(dtype))
            else:
                made.append(torch.ones(spec.shape, dtype=dtype))
        return tuple(made) if self.structure is None else self.structure.unflatten_inputs(tuple(made))

    def set_threads(self, threads: int) -> None:
        """CPU threads the backend uses (TVM's pool is process-wide, like torch's)."""
        self.executable.set_threads(threads)

    def latency(self, inputs: tuple | None = None, **options: Any) -> Latency:
        """Median/min wall-clock latency of one call (see fxpress.utils.timing.measure_latency)."""
        inputs = tuple(inputs) if inputs is not None else self.example_inputs()
        if self.structure is not None:
            inputs = self.structure.flatten(inputs)
        check_inputs(self.inputs, inputs)
        return measure_latency(lambda *xs: self.executable.run(xs), inputs, **options)

    # -- saving ----------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write manifest.json, params.safetensors and the library into `folder` (replaced whole)."""
        from safetensors.numpy import save_file

        from fxpress.backends.targets import get_target

        folder = Path(folder)
        staging = Path(tempfile.mkdtemp(prefix=".fxpress-", dir=folder.parent if folder.parent.exists() else None))
        try:
            save_file({k: v for k, v in self.executable.params.items()}, str(staging / PARAMS))
            library = self.executable.write_library(staging, "model", get_target(self.target).library)
            manifest = self._manifest(staging, library)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("saved %s (%s) to %s", self.name, self.target, folder)
        return folder

    def _manifest(self, folder: Path, library: str) -> dict:
        files = sorted(p.name for p in folder.iterdir())
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
                "backend": self.backend, "target": self.target, "versions": versions(self.backend),
                "inputs": [spec.to_json() for spec in self.inputs], "library": library,
                "param_names": list(getattr(self.executable, "param_names", self.executable.params)),
                "files": {name: sha256(folder / name) for name in files}, "info": self.info,
                "sizes": {name: (folder / name).stat().st_size for name in files},
                **({"quantized": quantized} if (quantized := getattr(self.executable, "quantized", None)) else {}),
                **({"structure": self.structure.to_json()} if self.structure is not None else {})}

    @classmethod
    def load(cls, folder: str | Path) -> CompiledModel:
        """Load a saved model; ArtifactError if anything is missing, tampered or mismatched."""
        from fxpress.backends.artifact_check import check_quantized, read_manifest, read_params, verify_files
        from fxpress.backends.registry import get_backend

        folder = Path(folder)
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        params = read_params(folder / PARAMS, manifest["param_names"])
        check_quantized(folder, manifest, params)
        executable = get_backend(manifest["backend"]).load(folder, manifest, params)
        inputs = [TensorSpec.from_json(record) for record in manifest["inputs"]]
        structure = IOStructure.from_json(manifest["structure"]) if "structure" in manifest else None
        return cls(executable=executable, inputs=inputs, target=manifest["target"],
                   name=str(manifest.get("name", "model")), info=dict(manifest.get("info", {})),
                   structure=structure)
