"""Remove dimension groups from a graph: slice every coupled parameter, resize every literal shape.

    new = shrink(graph, [group, ...], pass_name)

Each `DimensionGroup` (fxpress.analysis.dimension_flow) lists the parameter
slices to cut and the removed part of every activation it reached.  The
rewrite works on a copy:

1. every coupled tensor is replaced by a new, smaller tensor (tied tensors
   once, under every path that holds them; the caller's tensors are never
   written); sparsity masks (`Graph.masks`) are sliced the same way;
2. view / reshape / expand sizes that name a shrunk axis get the new size
   (`view(x, [2, 8, 9, 64])` -> `view(x, [2, 8, 6, 64])`; `-1` stays);
   a grouped-query `expand` whose copies lose different members per group
   keeps its input's sizes and shrinks its repeat axis;
3. the graph is re-annotated on its example inputs (shapes, MACs).

Ops that create tensors of a shrunk size from literals (zeros, arange,
split sizes, slices of a shrunk axis) cannot be followed: a PreconditionError
names the node.
"""
from __future__ import annotations

import math

import torch
from torch.fx import Node

from fxpress.analysis.dimension_flow import DimensionGroup
from fxpress.analysis.dimension_slices import mask_slices
from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph, shape_of
from fxpress.ops.coupling_masks import compress

aten = torch.ops.aten
SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
LITERAL_SIZES = {aten.zeros.default, aten.ones.default, aten.full.default, aten.empty.memory_format,
                 aten.arange.default, aten.arange.start, aten.split_with_sizes.default, aten.slice.Tensor,
                 aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default}


def merged_removals(groups: list[DimensionGroup]) -> dict[str, dict[int, set[int]]]:
    """Attribute path -> dim -> indices to remove, over all groups."""
    removals: dict[str, dict[int, set[int]]] = {}
    for group in groups:
        for piece in group.slices:
            removals.setdefault(piece.path, {}).setdefault(piece.dim, set()).update(piece.indices)
    return removals


def merged_masks(groups: list[DimensionGroup]) -> dict[str, torch.Tensor]:
    """Node name -> removed-element mask (main output only), over all groups."""
    masks: dict[str, torch.Tensor] = {}
    for group in groups:
        for (node, item), mask in group.masks.items():
            if item not in (None, 0):
                continue
            old = masks.get(node.name)
            masks[node.name] = mask if old is None else compress(old | mask)
    return masks


def _keep(size: int, removed: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def _cut(tensor: torch.Tensor, dims: dict[int, set[int]]) -> torch.Tensor:
    out = tensor.detach()
    for dim, removed in sorted(dims.items()):
        out = out.index_select(dim, _keep(out.shape[dim], removed))
    return out.contiguous()


def _install(graph: Graph, path: str, value: torch.Tensor, old: torch.Tensor) -> None:
    owner, _, leaf = path.rpartition(".")
    module = graph.module.get_submodule(owner) if owner else graph.module
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        setattr(module, leaf, value)


def _slice_parameters(graph: Graph, removals: dict[str, dict[int, set[int]]], pass_name: str) -> None:
    holders: dict[int, list[str]] = {}
    tensors = graph.owned_tensors()
    for path, tensor in tensors.items():
        holders.setdefault(id(tensor), []).append(path)
    done: dict[int, dict[int, set[int]]] = {}
    for path, dims in removals.items():
        tensor = graph.attribute(path)
        previous = done.get(id(tensor))
        if previous is not None:
            if previous != dims:
                raise PreconditionError(f"{path} is one tensor with {holders[id(tensor)][0]} but the groups cut "
                                        "them differently (weights shared across blocks?); prune width before "
                                        "share-weights", pass_name)
            continue
        done[id(tensor)] = dims
        new = _cut(tensor, dims)
        for holder in holders.get(id(tensor), [path]):
            _install(graph, holder, new, tensor)
            if holder in graph.masks:
                graph.masks[holder] = _cut(graph.masks[holder], dims)


def _new_shape(node: Node, mask: torch.Tensor, shapes: dict[str, tuple[int, ...]], pass_name: str) -> tuple:
    shape = shape_of(node)
    try:
        slices = mask_slices(node.name, mask, shape)
    except PreconditionError:
        slices = None
    if slices is not None:
        new = list(shape)
        for piece in slices:
            new[piece.dim] -= len(piece.indices)
        return tuple(new)
    if node.target == aten.expand.default:  # grouped-query repetition losing different copies per group
        source = node.args[0]
        source_new = shapes.get(source.name, shape_of(source))
        lead = len(shape) - len(source_new)
        new = [s if a < lead or shape_of(source)[a - lead] == 1 else source_new[a - lead]
               for a, s in enumerate(shape)]
        repeated = [a for a in range(lead, len(shape)) if shape_of(source)[a - lead] == 1 and shape[a] > 1]
        kept = math.prod(shape) - int(mask.expand(shape).sum())
        if len(repeated) == 1:
            rest = math.prod(s for a, s in enumerate(new) if a != repeated[0])
            if rest and kept % rest == 0:
                new[repeated[0]] = kept // rest
                return tuple(new)
    raise PreconditionError(f"the removed part of {node.format_node()} is not whole rows or channels; "
                            "this op cannot be resized", pass_name)


def _resize_args(node: Node, old: tuple, new: tuple, pass_name: str) -> None:
    sizes = list(node.args[1])
    if len(sizes) != len(old):
        raise PreconditionError(f"cannot resize {node.format_node()}: its size list does not match its output",
                                pass_name)
    for axis, (before, after) in enumerate(zip(old, new)):
        if before == after:
            continue
        item = sizes[axis]
        if isinstance(item, Node):
            raise PreconditionError(f"axis {axis} of {node.format_node()} has a symbolic size and shrinks; "
                                    "capture with a static size on that axis", pass_name)
        if item != -1:
            sizes[axis] = after
    node.args = (node.args[0], sizes, *node.args[2:])


def _literal_axis_shrinks(node: Node, old: tuple, new: tuple) -> bool:
    """Slices and splits name positions along one axis: only a change of that axis breaks them."""
    if node.target in (aten.slice.Tensor, aten.split_with_sizes.default):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return old[dim % len(old)] != new[dim % len(new)]
    return True


def _resize_nodes(graph: Graph, masks: dict[str, torch.Tensor], pass_name: str) -> None:
    shapes: dict[str, tuple[int, ...]] = {}
    for node in graph.fx.nodes:
        mask = masks.get(node.name)
        if mask is None or node.op != "call_function":
            continue
        old = shape_of(node)
        if not old:
            continue
        new = _new_shape(node, mask, shapes, pass_name)
        shapes[node.name] = new
        if new == old:
            continue
        if node.target in SIZED:
            _resize_args(node, old, new, pass_name)
        elif node.target in LITERAL_SIZES and _literal_axis_shrinks(node, old, new):
            raise PreconditionError(f"{node.format_node()} takes literal sizes or positions on an axis that "
                                    "shrinks; width pruning cannot follow it", pass_name)


def shrink(graph: Graph, groups: list[DimensionGroup], pass_name: str) -> Graph:
    """A new graph with every group's slices removed (the input graph is untouched)."""
    new = graph.copy()
    _slice_parameters(new, merged_removals(groups), pass_name)
    _resize_nodes(new, merged_masks(groups), pass_name)
    new.recompile()
    try:
        new.annotate()
    except Exception as err:  # noqa: BLE001 - any op may reject the new shapes
        raise PreconditionError(f"the graph no longer runs after removing the groups: {type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}", pass_name) from err
    return new
