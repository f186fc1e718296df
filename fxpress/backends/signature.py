"""What a backend receives from a Graph: its re-export, and the input signature of the compiled model.

A signature is what a CompiledModel checks every call against and what its
manifest records.  Dynamic dims accept any size; the others must match.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from fxpress.errors import ArtifactError, LoweringError
from fxpress.ir import Graph


def reexport(graph: Graph, dynamic: bool, backend: str) -> torch.export.ExportedProgram:
    """The Graph's module exported again (non-strict; dynamic dims kept when `dynamic`), for `backend`."""
    shapes = graph.dynamic_shapes if dynamic else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(graph.module, tuple(graph.example_inputs), dynamic_shapes=shapes,
                                       strict=False)
    except Exception as err:  # noqa: BLE001 - torch.export raises many kinds
        raise LoweringError(f"{backend} backend: cannot re-export graph {graph.name}: {type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0][:300]}") from err


@dataclass(frozen=True)
class TensorSpec:
    """One input: ``shape`` with the example sizes, ``dynamic`` maps dim -> label."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dynamic: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "dynamic": {str(k): v for k, v in self.dynamic.items()}}

    @classmethod
    def from_json(cls, record: dict) -> TensorSpec:
        try:
            return cls(name=str(record["name"]), shape=tuple(int(d) for d in record["shape"]),
                       dtype=str(record["dtype"]),
                       dynamic={int(k): str(v) for k, v in record.get("dynamic", {}).items()})
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"malformed input signature in manifest: {record!r}") from err

    def type_str(self) -> str:
        """``float32[batch, 1, 28, 28]``: dynamic dims by label."""
        dims = [self.dynamic.get(i, str(d)) for i, d in enumerate(self.shape)]
        return f"{self.dtype}[{', '.join(dims)}]"

    def describe(self) -> str:
        return f"{self.name}: {self.type_str()}"

    def accepts(self, tensor: torch.Tensor) -> bool:
        if dtype_str(tensor.dtype) != self.dtype or tensor.dim() != len(self.shape):
            return False
        return all(i in self.dynamic or size == want
                   for i, (size, want) in enumerate(zip(tensor.shape, self.shape)))


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in manifest")
    return value


def _input_names(graph: Graph, count: int) -> list[str]:
    names = [str(n.target) for n in graph.fx.nodes if n.op == "placeholder"]
    return names if len(names) == count else [f"input_{i}" for i in range(count)]


def input_specs(graph: Graph, *, dynamic: bool) -> list[TensorSpec]:
    """Signature of `graph`'s example inputs; its dynamic dims only when `dynamic`."""
    inputs = [x for x in graph.example_inputs if isinstance(x, torch.Tensor)]
    if len(inputs) != len(graph.example_inputs):
        raise ArtifactError("compiled models take tensor inputs only")
    shapes = graph.dynamic_shapes if dynamic and graph.dynamic_shapes else [None] * len(inputs)
    specs = []
    for name, tensor, dims in zip(_input_names(graph, len(inputs)), inputs, shapes):
        specs.append(TensorSpec(name=name, shape=tuple(tensor.shape), dtype=dtype_str(tensor.dtype),
                                dynamic={int(d): f"d{d}" for d in (dims or {})}))
    return specs


def check_inputs(specs: list[TensorSpec], inputs: tuple) -> None:
    """Raise ArtifactError naming expected vs got for any input that does not fit."""
    if len(inputs) != len(specs):
        raise ArtifactError(f"expected {len(specs)} inputs ({', '.join(s.describe() for s in specs)}), "
                            f"got {len(inputs)}")
    for spec, value in zip(specs, inputs):
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"input {spec.name}: expected a torch.Tensor, got {type(value).__name__}")
        if not spec.accepts(value):
            raise ArtifactError(f"input {spec.name}: expected {spec.type_str()}, "
                                f"got {dtype_str(value.dtype)}{list(value.shape)}")
