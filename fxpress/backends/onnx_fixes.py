"""Rewrites before ONNX export, for ops torch.onnx translates wrongly (each checked against eager in tests).

They run on the backend's private flat copy of the graph (never on the user's Graph), as a table
keyed by op:

- ``argmin`` / ``argmax`` over all elements with ``keepdim=True`` exported as shape ``[1]``
  instead of ``[1] * rank``: rewritten as the flat arg-reduction reshaped to ``[1] * rank``.
- ``conv3d`` without bias exported with a ``[out_channels, 2]`` zero bias, which onnxruntime
  rejects at the first call: given an explicit zero bias.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from fxpress.ir.graph import META_KEY

aten = torch.ops.aten


def _rank(node: torch.fx.Node) -> int | None:
    """The rank of a node's tensor, from torch.export's metadata or else fxpress's NodeInfo."""
    if not isinstance(node, torch.fx.Node):
        return None
    fake = node.meta.get("val")
    if isinstance(fake, torch.Tensor):
        return fake.dim()
    info = node.meta.get(META_KEY)
    return len(info.shape) if info is not None and info.shape is not None else None


def _whole_tensor_arg_reduction(fx: torch.fx.Graph, node: torch.fx.Node) -> None:
    """argmin(x, keepdim=True) -> argmin(reshape(x, [-1]), 0).reshape([1] * rank)."""
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    rank = _rank(x)
    if dim is not None or not keepdim or rank is None:
        return
    with fx.inserting_before(node):
        flat = fx.call_function(aten.reshape.default, (x, [-1]))
        reduced = fx.call_function(node.target, (flat, 0))
        kept = fx.call_function(aten.reshape.default, (reduced, [1] * rank))
    node.replace_all_uses_with(kept)
    fx.erase_node(node)


def _zero_bias(fx: torch.fx.Graph, node: torch.fx.Node) -> None:
    """conv3d(x, w) -> conv3d(x, w, zeros(out_channels))."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is not None:
        return
    weight = node.args[1]
    with fx.inserting_before(node):
        channels = fx.call_function(aten.sym_size.int, (weight, 0))
        zeros = fx.call_function(aten.new_zeros.default, (weight, [channels]))
    node.args = (node.args[0], weight, zeros, *node.args[3:])
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}


ONNX_FIXES: dict[object, Callable[[torch.fx.Graph, torch.fx.Node], None]] = {
    aten.argmin.default: _whole_tensor_arg_reduction,
    aten.argmax.default: _whole_tensor_arg_reduction,
    aten.conv3d.default: _zero_bias,
}


def fix_for_onnx(module: torch.fx.GraphModule) -> None:
    """Apply every rewrite of :data:`ONNX_FIXES` to `module` in place."""
    changed = False
    for node in list(module.graph.nodes):
        fix = ONNX_FIXES.get(node.target) if node.op == "call_function" else None
        if fix is not None:
            fix(module.graph, node)
            changed = True
    if changed:
        module.recompile()
