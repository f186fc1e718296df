"""Masks and coupling helpers shared by the coupling rules (`fxpress.ops.coupling_rules`).

A mask marks the removed elements of one tensor: a bool tensor of the
tensor's rank, each axis either full size or 1 (the same along that axis).
The helpers couple masks of two tensors both ways: through an index map
(`link`), axis to axis (`couple_axes`), several axes jointly (`couple_joint`),
or by broadcasting (`broadcast_args`).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch.fx import Node

from fxpress.ir.graph import META_KEY

Mask = torch.Tensor


class CouplingContext(Protocol):
    """What a coupling rule sees (implemented by the tracker)."""

    node: Node

    def mask(self, tensor: Any, item: int | None = None) -> Mask | None: ...
    def couple(self, tensor: Any, mask: Mask, item: int | None = None) -> None: ...
    def shape(self, tensor: Any, item: int | None = None) -> tuple[int, ...]: ...
    def fail(self, why: str) -> Exception: ...


# -- mask helpers ---------------------------------------------------------------------------------
def compress(mask: Mask) -> Mask:
    """The same mask with every axis along which it is constant reduced to size 1."""
    for axis in range(mask.dim()):
        if mask.shape[axis] > 1:
            every, some = mask.all(axis, keepdim=True), mask.any(axis, keepdim=True)
            if torch.equal(every, some):
                mask = some
    return mask


def axis_vector(mask: Mask, axis: int, size: int) -> Mask:
    """The positions along `axis` removed entirely (all of every other axis), as a vector of `size`."""
    others = [a for a in range(mask.dim()) if a != axis]
    vector = mask.all(dim=others) if others else mask
    return vector.reshape(-1).expand(size) if vector.numel() == 1 else vector.reshape(-1)


def place(vector: Mask, axis: int, rank: int) -> Mask:
    """A vector as a mask of `rank` along `axis` (every other axis of size 1)."""
    shape = [1] * rank
    shape[axis] = vector.numel()
    return vector.reshape(shape)


def reduce_to(mask: Mask, shape: tuple[int, ...]) -> Mask:
    """Backward through broadcasting: a source element goes only when all its copies go."""
    lead = mask.dim() - len(shape)
    if lead:
        mask = mask.all(dim=list(range(lead))) if mask.dim() else mask
    for axis, size in enumerate(shape):
        if size == 1 and mask.shape[axis] > 1:
            mask = mask.all(axis, keepdim=True)
    return mask


def full_along(mask: Mask, axis: int, size: int) -> Mask:
    """Materialize one axis (size 1 in a compressed mask) to `size`."""
    shape = list(mask.shape)
    shape[axis] = size
    return mask.expand(shape)


def schema_arg(node: Node, name: str, default: Any = None) -> Any:
    """An argument of an ATen node by schema name, positional or keyword."""
    names = [a.name for a in node.target._schema.arguments]
    index = names.index(name)
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def is_tensor(value: Any) -> bool:
    return isinstance(value, Node) and value.meta.get(META_KEY) is not None and \
        value.meta[META_KEY].shape is not None


# -- coupling helpers ---------------------------------------------------------------------------
def link(ctx: CouplingContext, arg: Node, forward: Callable[[Mask], Mask], backward: Callable[[Mask], Mask],
         arg_item: int | None = None, out_item: int | None = None) -> None:
    """Couple one input with the output through an index map each way."""
    found = ctx.mask(arg, arg_item)
    if found is not None:
        ctx.couple(ctx.node, forward(found), out_item)
    found = ctx.mask(ctx.node, out_item)
    if found is not None:
        ctx.couple(arg, backward(found), arg_item)


def link_operands(ctx: CouplingContext, a: Node, b: Node, forward: Callable[[Mask], Mask],
                  backward: Callable[[Mask], Mask]) -> None:
    """Couple two inputs of the node through an index map each way (the contracted axis of a matmul)."""
    found = ctx.mask(a)
    if found is not None:
        ctx.couple(b, forward(found))
    found = ctx.mask(b)
    if found is not None:
        ctx.couple(a, backward(found))


def couple_axes(ctx: CouplingContext, a: Any, axis_a: int, b: Any, axis_b: int, repeat: int = 1) -> None:
    """Couple axis `axis_a` of `a` with axis `axis_b` of `b`; with `repeat`, entry i of `a` is entries
    i*repeat .. (i+1)*repeat-1 of `b` (a depthwise multiplier, query heads sharing a KV head)."""
    if not all(is_tensor(t) or t is ctx.node for t in (a, b)):  # an absent bias
        return
    size_a, size_b = ctx.shape(a)[axis_a], ctx.shape(b)[axis_b]
    found = ctx.mask(a)
    if found is not None:
        vector = axis_vector(found, axis_a, size_a).repeat_interleave(repeat)
        ctx.couple(b, place(vector, axis_b, len(ctx.shape(b))))
    found = ctx.mask(b)
    if found is not None:
        vector = axis_vector(found, axis_b, size_b).reshape(size_a, repeat).all(1)
        ctx.couple(a, place(vector, axis_a, len(ctx.shape(a))))


def couple_joint(ctx: CouplingContext, a: Node, b: Node, axes: list[int], repeat_axis: int | None = None,
                 repeat: int = 1) -> None:
    """Couple the same `axes` of two tensors of one rank jointly (a head and its head-dim together); with
    `repeat`, entry i of `a` along `repeat_axis` is entries i*repeat .. (i+1)*repeat-1 of `b`."""
    others = lambda t: [x for x in range(len(ctx.shape(t))) if x not in axes]  # noqa: E731
    found = ctx.mask(a)
    if found is not None:
        joint = found.all(dim=others(a), keepdim=True) if others(a) else found
        ctx.couple(b, joint.repeat_interleave(repeat, repeat_axis) if repeat > 1 else joint)
    found = ctx.mask(b)
    if found is not None:
        joint = found.all(dim=others(b), keepdim=True) if others(b) else found
        if repeat > 1:
            joint = full_along(joint, repeat_axis, ctx.shape(b)[repeat_axis])
            shape = list(joint.shape)
            shape[repeat_axis:repeat_axis + 1] = [shape[repeat_axis] // repeat, repeat]
            joint = joint.reshape(shape).all(repeat_axis + 1)
        ctx.couple(a, joint)


def broadcast_args(ctx: CouplingContext, args: list) -> None:
    """Elementwise with broadcasting: each tensor argument against the output."""
    for arg in args:
        if is_tensor(arg):
            lead = len(ctx.shape(ctx.node)) - len(ctx.shape(arg))
            link(ctx, arg, lambda m, lead=lead: m.reshape((1,) * lead + tuple(m.shape)),
                 lambda m, arg=arg: reduce_to(m, ctx.shape(arg)))
