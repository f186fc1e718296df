"""Lowering rules for ATen ops where TVM 0.27's importer differs from torch.

- ``aten::cumsum``: torch promotes bool and integer inputs to int64 when no
  dtype is given; the importer kept ``bool`` and LLVM codegen then failed
  adding booleans (``CreateAdd ... kDLFloat``).  Hugging Face LLaMA builds
  position ids / masks with a cumsum over a bool mask, so the tiny LLaMA and
  SmolLM2 failed here.

Imported by :mod:`.lowering`, so the rules are in the table before any check.
"""
from __future__ import annotations

import torch

from fxpress.backends.tvm.rules import RuleContext, register_lowering

INTEGRAL_PREFIXES = ("bool", "int", "uint")


@register_lowering("aten::cumsum")
def lower_cumsum(ctx: RuleContext, node: torch.fx.Node):
    """cumsum(x, dim, dtype=None) with torch's promotion of bool/integers to int64."""
    from tvm import relax

    from fxpress.backends.tvm.lowering import torch_dtype_name

    x = ctx.args(node)[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dtype = node.kwargs.get("dtype")
    if dtype is not None:
        dtype = torch_dtype_name(dtype)
    elif str(x.ty.dtype).startswith(INTEGRAL_PREFIXES):
        dtype = "int64"
    if dtype is not None and str(x.ty.dtype) != dtype:
        x = ctx.bb.emit(relax.op.astype(x, dtype))
    return ctx.bb.emit(relax.op.cumsum(x, dim))
