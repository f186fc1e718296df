"""The tensor signature of a compiled model: what it checks every call (and every output) against.

A signature is what a CompiledModel checks every call against and what its
manifest records.  Dynamic dims accept any size up to their bound, if the build
has one (``max_sizes``: memory planned for that size); the others must match.
The graph's re-export over flat tensors is :func:`fxpress.backends.structure.export_flat`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxpress.errors import ArtifactError


@dataclass(frozen=True)
class TensorSpec:
    """One input: ``shape`` with the example sizes, ``dynamic`` maps dim -> label, ``bounds`` dim -> the
    largest size a dynamic dim takes (a build with ``max_sizes``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dynamic: dict[int, str] = field(default_factory=dict)
    bounds: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        record = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                  "dynamic": {str(k): v for k, v in self.dynamic.items()}}
        if self.bounds:
            record["bounds"] = {str(k): v for k, v in self.bounds.items()}
        return record

    @classmethod
    def from_json(cls, record: dict) -> TensorSpec:
        try:
            return cls(name=str(record["name"]), shape=tuple(int(d) for d in record["shape"]),
                       dtype=str(record["dtype"]),
                       dynamic={int(k): str(v) for k, v in record.get("dynamic", {}).items()},
                       bounds={int(k): int(v) for k, v in record.get("bounds", {}).items()})
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"malformed input signature in manifest: {record!r}") from err

    def type_str(self) -> str:
        """``float32[batch, 1, 28, 28]``: dynamic dims by label (``d0<=64`` where bounded)."""
        dims = [self.dynamic[i] + (f"<={self.bounds[i]}" if i in self.bounds else "") if i in self.dynamic
                else str(d) for i, d in enumerate(self.shape)]
        return f"{self.dtype}[{', '.join(dims)}]"

    def describe(self) -> str:
        return f"{self.name}: {self.type_str()}"

    def accepts(self, tensor: torch.Tensor) -> bool:
        if dtype_str(tensor.dtype) != self.dtype or tensor.dim() != len(self.shape):
            return False
        return all(size <= self.bounds.get(i, size) if i in self.dynamic else size == want
                   for i, (size, want) in enumerate(zip(tensor.shape, self.shape)))

    def above_bounds(self, tensor: torch.Tensor) -> list[str]:
        """``d0 = 128 > 64`` for each bounded dim of `tensor` above its bound."""
        return [f"{self.dynamic[i]} = {tensor.shape[i]} > {bound}" for i, bound in sorted(self.bounds.items())
                if i < tensor.dim() and tensor.shape[i] > bound]


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in manifest")
    return value


def check_inputs(specs: list[TensorSpec], inputs: tuple) -> None:
    """Raise ArtifactError naming expected vs got for any input that does not fit."""
    if len(inputs) != len(specs):
        raise ArtifactError(f"expected {len(specs)} inputs ({', '.join(s.describe() for s in specs)}), "
                            f"got {len(inputs)}")
    for spec, value in zip(specs, inputs):
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"input {spec.name}: expected a torch.Tensor, got {type(value).__name__}")
        if not spec.accepts(value):
            above = spec.above_bounds(value)
            hint = (f" ({', '.join(above)}: the build planned its memory for those sizes; compile again with "
                    f"larger max_sizes)") if above else ""
            raise ArtifactError(f"input {spec.name}: expected {spec.type_str()}, "
                                f"got {dtype_str(value.dtype)}{list(value.shape)}{hint}")
