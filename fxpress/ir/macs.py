"""Multiply-accumulate counts per op, computed from shapes.

One table keyed by op: each entry turns a node's input and output shapes
into a MAC count.  Ops that are not in the table do no multiply-accumulate
work worth counting (elementwise, views, reductions) and count 0: that is
the table's explicit default, so a new matmul-like op must be added here
or it silently counts nothing - `MAC_OPS` is the list to extend.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

aten = torch.ops.aten
Shape = Sequence[int]


def _numel(shape: Shape) -> int:
    return math.prod(shape) if shape else 1


def _linear(arg_shapes: list[Shape | None], out: Shape) -> int:
    weight = arg_shapes[1]
    return _numel(out) * (weight[-1] if weight else 0)


def _mm(arg_shapes: list[Shape | None], out: Shape) -> int:
    left = arg_shapes[0]
    return _numel(out) * (left[-1] if left else 0)


def _addmm(arg_shapes: list[Shape | None], out: Shape) -> int:
    left = arg_shapes[1]
    return _numel(out) * (left[-1] if left else 0)


def _conv(arg_shapes: list[Shape | None], out: Shape) -> int:
    weight = arg_shapes[1]
    if not weight:
        return 0
    # weight: (C_out, C_in / groups, *kernel); each output element reads C_in/groups * k values
    return _numel(out) * _numel(weight[1:])


def _sdpa(arg_shapes: list[Shape | None], out: Shape) -> int:
    query, key = arg_shapes[0], arg_shapes[1]
    if not query or not key:
        return 0
    scores = _numel(query[:-1]) * key[-2]
    return scores * query[-1] + scores * out[-1]


MacRule = Callable[[list, Shape], int]

MAC_OPS: dict[object, MacRule] = {
    aten.linear.default: _linear,
    aten.mm.default: _mm,
    aten.bmm.default: _mm,
    aten.matmul.default: _mm,
    aten.addmm.default: _addmm,
    aten.baddbmm.default: _addmm,
    aten.conv1d.default: _conv,
    aten.conv2d.default: _conv,
    aten.conv3d.default: _conv,
    aten.convolution.default: _conv,
    aten.scaled_dot_product_attention.default: _sdpa,
    torch.nn.functional.linear: _linear,
    torch.matmul: _mm,
    torch.bmm: _mm,
    torch.nn.functional.conv2d: _conv,
}



def node_macs(target: object, arg_shapes: list[Shape | None], out_shape: Shape | None) -> int:
    """MACs of one op given its tensor argument shapes (None for non-tensors)."""
    rule = MAC_OPS.get(target)
    if rule is None or out_shape is None:
        return 0
    return int(rule(arg_shapes, out_shape))


def module_macs(module: torch.nn.Module, out_shape: Shape | None) -> int:
    """MACs of a leaf module called from a symbolically traced graph."""
    if out_shape is None:
        return 0
    if isinstance(module, torch.nn.Linear):
        return _numel(out_shape) * module.in_features
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return _numel(out_shape) * _numel(module.weight.shape[1:])
    return 0
