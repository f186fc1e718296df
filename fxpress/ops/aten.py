"""Facts about the ATen ops fxpress reasons about: MAC rules, categories, dimension flow.

One `OpInfo` per op (see `fxpress.ir.opinfo`).  MAC rules turn a node's
argument and output shapes into multiply-accumulates; an op without a MAC
rule counts 0 (elementwise, views, reductions), which is the table's
explicit default, so a new matmul-like op must be defined here or it counts
nothing.  Flow rules come from `flow_rules.py`.  Leaf modules of
symbolically traced graphs (`nn.Linear`, `nn.Conv2d`) are defined too; their
rules receive the module's parameter shapes, weight first.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch

from fxpress.ir.opinfo import OpInfo, define_op
from fxpress.ops.coupling_rules import COUPLING_RULES
from fxpress.ops.flow_rules import FLOW_RULES

aten = torch.ops.aten
Shape = Sequence[int]


def numel(shape: Shape) -> int:
    return math.prod(shape) if shape else 1


def linear_macs(node: Any, arg_shapes: list, out: Shape) -> int:
    """out elements x in-features (the weight's last dim)."""
    weight = arg_shapes[1]
    return numel(out) * (weight[-1] if weight else 0)


def matmul_macs(node: Any, arg_shapes: list, out: Shape) -> int:
    """out elements x the contracted dim (the left operand's last)."""
    left = arg_shapes[0]
    return numel(out) * (left[-1] if left else 0)


def addmm_macs(node: Any, arg_shapes: list, out: Shape) -> int:
    left = arg_shapes[1]
    return numel(out) * (left[-1] if left else 0)


def conv_macs(node: Any, arg_shapes: list, out: Shape) -> int:
    """weight (C_out, C_in / groups, *kernel): each output element reads C_in/groups * k values."""
    weight = arg_shapes[1]
    return numel(out) * numel(weight[1:]) if weight else 0


def sdpa_macs(node: Any, arg_shapes: list, out: Shape) -> int:
    """q @ k^T and probabilities @ v."""
    query, key = arg_shapes[0], arg_shapes[1]
    if not query or not key:
        return 0
    scores = numel(query[:-1]) * key[-2]
    return scores * query[-1] + scores * out[-1]


def _module_linear(node: Any, param_shapes: list, out: Shape) -> int:
    return numel(out) * param_shapes[0][-1] if param_shapes else 0


def _module_conv(node: Any, param_shapes: list, out: Shape) -> int:
    return numel(out) * numel(param_shapes[0][1:]) if param_shapes else 0


CATEGORIES: dict[str, tuple] = {
    "matmul": (aten.linear.default, aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default,
               aten.baddbmm.default, torch.nn.functional.linear, torch.matmul, torch.bmm),
    "conv": (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
             aten.conv1d.padding, aten.conv2d.padding, torch.nn.functional.conv2d),
    "attention": (aten.scaled_dot_product_attention.default,),
    "softmax": (aten.softmax.int, aten._softmax.default, aten.special_softmax.default, aten.log_softmax.int),
    "norm": (aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
             aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default, aten.group_norm.default),
    "elementwise": (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
                    aten.where.ScalarOther, aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar, aten.maximum.default,
                    aten.minimum.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.gelu.default,
                    aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
                    aten.exp.default, aten.log.default, aten.neg.default, aten.rsqrt.default, aten.sqrt.default,
                    aten.abs.default, aten.dropout.default, aten.cos.default, aten.sin.default,
                    aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
                    aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor,
                    aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.le.Scalar, aten.gt.Scalar, aten.ge.Scalar),
    "cast": (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.contiguous.default,
             aten.clone.default, aten.alias.default, aten.detach.default),
    "view": (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
             aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
             aten.squeeze.default, aten.expand.default, aten.select.int, aten.slice.Tensor, aten.unbind.int,
             aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default, aten.cat.default,
             operator.getitem),
    "reduction": (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default),
    "pool": (aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.avg_pool1d.default,
             aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
             aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default, aten.adaptive_max_pool2d.default),
    "embedding": (aten.embedding.default,),
    "shape": (aten.sym_size.int, aten._assert_tensor_metadata.default),
    "creation": (aten.ones_like.default, aten.zeros_like.default, aten.empty_like.default, aten.full_like.default,
                 aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default),
}
MAC_RULES = {
    aten.linear.default: linear_macs, torch.nn.functional.linear: linear_macs,
    aten.mm.default: matmul_macs, aten.bmm.default: matmul_macs, aten.matmul.default: matmul_macs,
    torch.matmul: matmul_macs, torch.bmm: matmul_macs,
    aten.addmm.default: addmm_macs, aten.baddbmm.default: addmm_macs,
    aten.conv1d.default: conv_macs, aten.conv2d.default: conv_macs, aten.conv3d.default: conv_macs,
    aten.convolution.default: conv_macs, torch.nn.functional.conv2d: conv_macs,
    aten.scaled_dot_product_attention.default: sdpa_macs,
}


def define_aten_ops() -> None:
    """Define the facts of every ATen op above, and of the traced leaf modules."""
    for category, targets in CATEGORIES.items():
        for target in targets:
            define_op(OpInfo(target, category, MAC_RULES.get(target), FLOW_RULES.get(target),
                             coupling=COUPLING_RULES.get(target)))
    for module in (torch.nn.Linear,):
        define_op(OpInfo(module, "matmul", _module_linear))
    for module in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d):
        define_op(OpInfo(module, "conv", _module_conv))


define_aten_ops()
