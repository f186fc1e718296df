"""Parameter slices of a dimension group: turning the tracker's masks into `ParamSlice`s and text.

A mask (see `fxpress.ops.coupling_rules`) marks the removed elements of one
tensor; for a parameter it must be a union of whole slices along its axes
(rows, columns, channels), each of which becomes one `ParamSlice`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph, shape_of
from fxpress.ops.coupling_masks import axis_vector, place


@dataclass(frozen=True)
class ParamSlice:
    """Indices `indices` along dim `dim` of the tensor at attribute path `path`."""

    path: str
    dim: int
    indices: tuple[int, ...]
    rank: int = field(default=0, compare=False, repr=False)  # the tensor's rank, for printing only

    @property
    def role(self) -> str:
        if self.rank <= 1:
            return "channels"
        return {0: "out-channels", 1: "in-channels"}.get(self.dim, f"dim {self.dim}")

    def index_text(self) -> str:
        """`[3:5, :]`-style subscript of this slice."""
        parts = [":"] * max(self.rank, self.dim + 1)
        parts[self.dim] = format_indices(self.indices)
        return f"[{', '.join(parts)}]"

    def __str__(self) -> str:
        return f"{self.role} of {self.path}{self.index_text()}"


def format_indices(indices: tuple[int, ...]) -> str:
    """Runs of consecutive indices as `a:b`; `5`, `0:64`, `{0:2, 7}`."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([index, index + 1])
    texts = [str(a) if b == a + 1 else f"{a}:{b}" for a, b in runs]
    return texts[0] if len(texts) == 1 else "{" + ", ".join(texts) + "}"


def mask_slices(path: str, mask: torch.Tensor, shape: tuple[int, ...]) -> list[ParamSlice]:
    """A mask as whole slices along axes of a tensor of `shape`; an error when it is not such a union."""
    if not shape:
        return [ParamSlice(path, 0, (0,), 0)] if bool(mask.all()) else []
    slices, union = [], torch.zeros(mask.shape, dtype=torch.bool)
    for axis, size in enumerate(shape):
        vector = axis_vector(mask, axis, size)
        if vector.any() and (mask.shape[axis] > 1 or bool(vector.all())):
            slices.append(ParamSlice(path, axis, tuple(int(i) for i in vector.nonzero().flatten()), len(shape)))
            union = union | place(vector, axis, len(shape))
    if not torch.equal(union.expand(shape) if union.dim() else union, mask.expand(shape)):
        raise PreconditionError(f"the removed part of {path} {list(shape)} is not a union of whole rows, "
                                "columns or channels; the seed does not select a structural dimension")
    if len(slices) == len(shape) and all(len(s.indices) == n for s, n in zip(slices, shape)):
        slices = slices[:1]  # the whole tensor: one slice says it
    return slices


def _first_use(node: Node, order: dict[Node, int]) -> int:
    return min((order[u] for u in node.users), default=order[node])


def parameter_slices(graph: Graph, masks: dict[tuple[Node, Any], torch.Tensor]) -> list[ParamSlice]:
    """Slices of every parameter or buffer reached, ordered by their first use in the graph."""
    order = {n: i for i, n in enumerate(graph.fx.nodes)}
    params = sorted((node for node, item in masks if node.op == "get_attr"),
                    key=lambda n: (_first_use(n, order), order[n]))
    found: dict[ParamSlice, None] = {}
    for node in params:
        for piece in mask_slices(str(node.target), masks[(node, None)], shape_of(node)):
            found.setdefault(piece)
    return list(found)


def tensor_slices(graph: Graph, masks: dict[tuple[Node, Any], torch.Tensor]) -> tuple[list, list]:
    """Graph inputs and outputs the group reaches (a width pass must leave those alone or say so)."""
    inputs = [piece for node in graph.fx.nodes if node.op == "placeholder" and (node, None) in masks
              for piece in mask_slices(node.name, masks[(node, None)], shape_of(node))]
    outputs = []
    output = next(n for n in graph.fx.nodes if n.op == "output")
    flat, _ = torch.utils._pytree.tree_flatten(output.args[0])
    for position, value in enumerate(flat):
        if isinstance(value, Node) and (value, None) in masks:
            outputs += mask_slices(f"output[{position}]", masks[(value, None)], shape_of(value))
    return inputs, outputs


def describe_seed(node: Node, axis: int, indices: list[int]) -> str:
    return f"indices {format_indices(tuple(indices))} of axis {axis} of {node.name}"


def group_lines(seed: str, slices: list[ParamSlice], inputs: list[ParamSlice],
                outputs: list[ParamSlice]) -> list[str]:
    """`prune out-channels of a.weight[3, :]` then one `=> ...` line per coupled slice."""
    lines = [f"dimension group: {seed} ({len(slices)} parameter slices)"]
    for position, piece in enumerate(slices):
        lines.append(f"  {'prune' if position == 0 else '=>'} {piece}")
    for label, touched in (("graph input", inputs), ("graph output", outputs)):
        lines += [f"  => {label} {p.path}{p.index_text()}" for p in touched]
    return lines
