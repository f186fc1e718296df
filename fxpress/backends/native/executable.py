"""The native target as a compiled model: binary and quantized layers on the C kernels, the rest in PyTorch.

``build_native(graph)`` re-exports the graph with ``torch.export`` and keeps
two things: the program's graph as torch.export's JSON schema (the saved
"library", ``model.json``: ops by name, no code, no pickle) and its tensors
(parameters, buffers, constants) for ``params.safetensors``.  The program is
then lowered with :func:`~fxpress.backends.native.lowering.lower_native`,
which packs every binary layer's weight once.  Loading does the same from
the two files: deserialize the JSON with the saved tensors, capture the
program's module, lower it.

Tensor names in the params file carry their kind, ``parameter:conv.weight``,
``buffer:bn.running_mean``, ``constant:c_plan``, because torch.export puts
them back in different places.  Quantized weights are saved as their planes (uint8 codes, float32
scales, uint8 or float32 zeros, codebooks), each its own entry in its stored dtype, and
``executable.quantized`` describes them for the manifest (``quant_planes.py``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxpress.backends.native.lowering import NativeProgram, lower_native
from fxpress.backends.native.quant_lowering import KERNELS
from fxpress.backends.native.quant_planes import describe_quantized
from fxpress.backends.signature import TensorSpec
from fxpress.backends.structure import IOStructure, example_tensor, export_flat
from fxpress.errors import ArtifactError, LoweringError, first_line
from fxpress.ir import Graph, capture

log = logging.getLogger(__name__)

KINDS = ("parameter", "buffer", "constant")


def _program_tensors(program: torch.export.ExportedProgram) -> dict[str, np.ndarray]:
    """Every tensor the program holds, keyed ``kind:name``, as contiguous numpy arrays."""
    parameters = set(program.graph_signature.parameters)
    tensors: dict[str, np.ndarray] = {}
    for name, value in program.state_dict.items():
        kind = "parameter" if name in parameters else "buffer"
        tensors[f"{kind}:{name}"] = np.ascontiguousarray(value.detach().cpu().numpy())
    for name, value in program.constants.items():
        if not isinstance(value, torch.Tensor):
            raise LoweringError(f"native backend: constant {name} is a {type(value).__name__}, not a tensor; "
                                f"it cannot be saved as safetensors")
        tensors[f"constant:{name}"] = np.ascontiguousarray(value.detach().cpu().numpy())
    return tensors


def _program_from(schema_json: bytes, tensors: dict[str, np.ndarray]) -> torch.export.ExportedProgram:
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    state_dict: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        kind, _, name = key.partition(":")
        tensor = torch.from_numpy(np.array(value))  # a writable copy
        if kind == "parameter":
            state_dict[name] = torch.nn.Parameter(tensor, requires_grad=False)
        elif kind == "buffer":
            state_dict[name] = tensor
        elif kind == "constant":
            constants[name] = tensor
        else:
            raise ArtifactError(f"params entry {key!r} has no kind; expected one of {', '.join(KINDS)}")
    return deserialize(SerializedArtifact(schema_json, state_dict, constants, None))


class NativeExecutable:
    """A graph lowered onto the native kernels, with its saved form (schema JSON + tensors)."""

    backend = "native"

    def __init__(self, program: NativeProgram, schema_json: bytes, params: dict[str, np.ndarray],
                 quantized: dict[str, dict] | None = None):
        self.program = program
        self.schema_json = schema_json
        self.params = params
        self.param_names = list(params)
        self.quantized = quantized or {}  # the manifest's "quantized" records (quant_planes.py)

    @property
    def lowered(self) -> list[str]:
        """Module paths of the layers that run on the native kernels."""
        return list(self.program.lowered)

    @property
    def quantized_kernels(self) -> dict[str, str]:
        """Each quantized linear's module path -> the kernel it runs on ('reference (why)' for none)."""
        return dict(self.program.quantized)

    def set_threads(self, threads: int) -> None:
        """The kernels are single-threaded; the PyTorch part follows torch's (process-wide) threads."""
        torch.set_num_threads(int(threads))

    def run(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        outputs = self.program(*inputs)
        return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]

    def write_library(self, folder: Path, stem: str, fmt: str) -> str:
        name = f"{stem}.{fmt}"
        (folder / name).write_bytes(self.schema_json)
        return name


def _lowered(program: torch.export.ExportedProgram, inputs: tuple, dynamic: Any, name: str) -> NativeProgram:
    graph = capture(program.module(), inputs, dynamic=dynamic, name=name)
    return lower_native(graph)


def build_native(graph: Graph, *, dynamic: bool = False) -> tuple[NativeExecutable, list[TensorSpec], IOStructure]:
    """Lower `graph`'s binary ops onto the native kernels; the executable, its input signature and
    IOStructure."""
    from torch._export.serde.serialize import serialize

    flat = export_flat(graph, dynamic, "native")
    try:
        schema = serialize(flat.program, serialize_state_dict=False, serialize_constants=False,
                           serialize_example_inputs=False).exported_program
    except Exception as err:  # noqa: BLE001 - torch's serializer raises many kinds
        raise LoweringError(f"native backend: cannot serialize graph {graph.name}'s program: "
                            f"{type(err).__name__}: {first_line(err)}") from err
    tensors = _program_tensors(flat.program)
    native = _lowered(flat.program, flat.example_inputs, _dynamic_dims(flat.inputs), graph.name)
    log.info("native: %s with %d binary layers and %d quantized linears on the kernels", graph.name,
             len(native.lowered), sum(kernel in KERNELS for kernel in native.quantized.values()))
    executable = NativeExecutable(native, schema, tensors, describe_quantized(graph, tensors))
    return executable, flat.inputs, flat.structure


def _dynamic_dims(specs: list[TensorSpec]) -> dict | bool:
    dims = {index: {dim: label for dim, label in spec.dynamic.items()} for index, spec in enumerate(specs)}
    return {index: found for index, found in dims.items() if found} or False


def load_from_manifest(folder: Path, manifest: dict, params: dict[str, np.ndarray]) -> NativeExecutable:
    """Rebuild a saved native model from its schema JSON and tensors (both checked by hash before)."""
    schema_json = (folder / manifest["library"]).read_bytes()
    tensors = {name: params[name] for name in manifest["param_names"]}
    try:
        program = _program_from(schema_json, tensors)
    except ArtifactError:
        raise
    except Exception as err:  # noqa: BLE001 - torch's deserializer raises many kinds
        raise ArtifactError(f"cannot read the native program {folder / manifest['library']}: "
                            f"{type(err).__name__}: {first_line(err)}") from err
    specs = [TensorSpec.from_json(record) for record in manifest["inputs"]]
    inputs = tuple(example_tensor(spec) for spec in specs)
    native = _lowered(program, inputs, _dynamic_dims(specs), str(manifest.get("name", "model")))
    return NativeExecutable(native, schema_json, tensors, manifest.get("quantized"))
