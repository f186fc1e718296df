"""Which input sizes a model accepts, so metrics batch data the way it can be called.

An eager ``nn.Module`` (or any plain callable) takes any batch and sequence
length.  A captured :class:`fxpress.ir.Graph` fixes every dim of its
example inputs except those in its ``dynamic_shapes``; a compiled model
(``fxpress.backends.CompiledModel``) fixes every dim of its input
signature except those in ``TensorSpec.dynamic``.  Metrics ask here for
the batch size and sequence length to use: a fixed dim wins over the
default, and an explicit request that contradicts it is a DataError.
"""
from __future__ import annotations

from typing import Any

import torch

from fxpress.backends.signature import TensorSpec
from fxpress.errors import DataError
from fxpress.ir import Graph

BATCH_DIM = 0
SEQ_DIM = 1


def fixed_dims(fn: Any) -> list[dict[int, int]]:
    """Per input of `fn`: dim -> the size it must have.  Empty for callables that take any shape."""
    if isinstance(fn, Graph):
        return _graph_fixed_dims(fn)
    return [{d: size for d, size in enumerate(s.shape) if d not in s.dynamic} for s in _signature(fn)]


def _signature(fn: Any) -> list[TensorSpec]:
    """A compiled model's input signature; [] for other callables."""
    specs = getattr(fn, "inputs", None)
    if isinstance(specs, list) and specs and all(isinstance(s, TensorSpec) for s in specs):
        return specs
    return []


def _graph_fixed_dims(graph: Graph) -> list[dict[int, int]]:
    shapes = graph.dynamic_shapes
    if isinstance(shapes, dict):  # keyed by argument name, in call order
        shapes = list(shapes.values())
    shapes = list(shapes) if shapes else []
    fixed = []
    for index, value in enumerate(graph.example_inputs):
        if not isinstance(value, torch.Tensor):
            fixed.append({})
            continue
        dynamic = _dynamic_axes(shapes[index] if index < len(shapes) else None)
        fixed.append({d: int(size) for d, size in enumerate(value.shape) if d not in dynamic})
    return fixed


def _dynamic_axes(spec: Any) -> set[int]:
    """The dims a torch.export dynamic_shapes entry for one input leaves free."""
    if isinstance(spec, dict):
        return {int(d) for d in spec}
    if isinstance(spec, (list, tuple)):
        return {d for d, dim in enumerate(spec) if dim is not None}
    return set()


def fixed_size(fn: Any, dim: int, input_index: int = 0) -> int | None:
    """The size input `input_index` of `fn` must have along `dim`, or None if it may vary."""
    fixed = fixed_dims(fn)
    return fixed[input_index].get(dim) if input_index < len(fixed) else None


def bounded_size(fn: Any, dim: int, input_index: int = 0) -> int | None:
    """The largest size input `input_index` of `fn` takes along a bounded dynamic `dim` (a compiled model
    built with ``max_sizes``), or None."""
    specs = _signature(fn)
    return specs[input_index].bounds.get(dim) if input_index < len(specs) else None


def batch_size_for(fn: Any, requested: int | None, default: int) -> int:
    """`fn`'s static batch size if it has one, else `requested` or `default` (at most its bound)."""
    return _size_for(fn, BATCH_DIM, requested, default, "batch", "batch_size={static}", "a dynamic batch")


def seq_len_for(fn: Any, requested: int | None, default: int) -> int:
    """`fn`'s static sequence length (dim 1 of its first input) if it has one, else `requested` or `default`."""
    return _size_for(fn, SEQ_DIM, requested, default, "sequence length", "{static} tokens",
                     "a dynamic sequence dim")


def _size_for(fn: Any, dim: int, requested: int | None, default: int, what: str, use: str, instead: str) -> int:
    if requested is not None and requested < 1:
        raise DataError(f"{what} must be >= 1, got {requested}")
    static = fixed_size(fn, dim)
    if static is None:
        bound = bounded_size(fn, dim)
        if bound is not None and requested is not None and requested > bound:
            raise DataError(f"{_name(fn)} takes a {what} of at most {bound} (compiled with max_sizes): "
                            f"ask for {bound} or fewer, or compile it with a larger bound")
        return min(requested or default, bound) if bound is not None else requested or default
    if requested not in (None, static):
        raise DataError(f"{_name(fn)} has a static {what} of {static}: use {use.format(static=static)} "
                        f"(or None), or capture it with {instead}")
    return static


def fit_rows(fn: Any, batch: torch.Tensor, rows: int) -> torch.Tensor:
    """`batch` padded to `rows` rows where `fn`'s batch is static (callers drop the padding's outputs)."""
    return pad_rows(batch, rows) if fixed_size(fn, BATCH_DIM) is not None else batch


def pad_rows(batch: torch.Tensor, rows: int) -> torch.Tensor:
    """`batch` with copies of its last row appended up to `rows` rows (a static batch's short tail)."""
    missing = rows - batch.shape[0]
    if missing <= 0:
        return batch
    return torch.cat([batch, batch[-1:].expand(missing, *batch.shape[1:])])


def _name(fn: Any) -> str:
    name = getattr(fn, "name", None)
    return f"model {name!r}" if isinstance(name, str) else "the model"
