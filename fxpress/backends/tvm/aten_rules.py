"""Lowering rules for ATen ops where TVM 0.27's importer differs from torch.

- ``aten::cumsum``: torch promotes bool and integer inputs to int64 when no
  dtype is given; the importer kept ``bool`` and LLVM codegen then failed
  adding booleans (``CreateAdd ... kDLFloat``).  Hugging Face LLaMA builds
  position ids / masks with a cumsum over a bool mask, so the tiny LLaMA and
  SmolLM2 failed here.

- ``aten::upsample_bicubic2d.vec``: core-ATen decomposition turned it into
  16 gathers and their clamps and weights (gdnet-lite's bicubic baseline: 32
  kernel calls), and the importer's own converter uses TVM's cubic kernel
  (a = -0.5) where torch uses a = -0.75.  :func:`kept_whole` keeps it from
  decomposition and :func:`lower_upsample_bicubic` makes it one ``resize2d``.

- ``aten::add.Tensor`` / ``aten::sub.Tensor`` with ``alpha``: the importer
  reads the positional arguments only and dropped alpha, so
  ``add(a, b, alpha=c)`` computed a + b.  merge-tokens' prop_attn writes its
  logits bias that way (vit-mnist's logits were off by up to 4).

Imported by :mod:`.lowering`, so the rules are in the table before any check.
"""
from __future__ import annotations

import torch

from fxpress.backends.preflight import _argument
from fxpress.backends.tvm.rules import OPAQUE, RuleContext, op_name, register_lowering
from fxpress.errors import LoweringError

INTEGRAL_PREFIXES = ("bool", "int", "uint")
TORCH_CUBIC_ALPHA = -0.75  # torch's bicubic kernel coefficient (TVM's resize2d defaults to -0.5)


def kept_whole(program: torch.export.ExportedProgram) -> list:
    """The ops of `program` that lowering keeps out of core-ATen decomposition, for a rule of their own:
    ``upsample_bicubic2d.vec`` when every such node's output size is what resize2d maps the same way
    as torch (an explicit size, or a scale that gives a whole size: torch then maps by the scale,
    resize2d by the size ratio, which agree)."""
    bicubic = torch.ops.aten.upsample_bicubic2d.vec
    nodes = [n for n in program.graph.nodes if n.op == "call_function" and n.target is bicubic]
    return [bicubic] if nodes and all(_bicubic_size(n) is not None for n in nodes) else []


def _bicubic_size(node: torch.fx.Node) -> list[int] | None:
    """(out_h, out_w) of an upsample_bicubic2d.vec node when static and mapped alike by torch and resize2d."""
    value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if value is None or value.dim() != 4 or not all(isinstance(d, int) for d in value.shape[2:]):
        return None
    size, scales = _argument(node, "output_size"), _argument(node, "scale_factors")
    if size is not None:
        return [int(d) for d in size] if all(isinstance(d, int) for d in size) else None
    if scales is None or len(scales) != 2:
        return None
    out = [dim * scale for dim, scale in zip(value.shape[2:], scales)]
    return [int(o) for o in out] if all(float(o).is_integer() for o in out) else None


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


@register_lowering("aten::upsample_bicubic2d.vec")
def lower_upsample_bicubic(ctx: RuleContext, node: torch.fx.Node):
    """Bicubic upsampling as one ``resize2d`` with torch's kernel (a = -0.75, borders clamped)."""
    from tvm import relax

    size = _bicubic_size(node)
    if size is None:  # kept_whole keeps only nodes with a size; a graph lowered another way may not
        raise LoweringError(f"upsample_bicubic2d at node {node.format_node()}: the TVM rule needs static input "
                            f"sizes and an output size or a scale giving whole sizes; pass size= to interpolate")
    align_corners = bool(_argument(node, "align_corners"))
    x = ctx.args(node)[0]
    return ctx.bb.emit(relax.op.image.resize2d(
        x, size, layout="NCHW", method="cubic",
        coordinate_transformation_mode="align_corners" if align_corners else "half_pixel",
        cubic_alpha=TORCH_CUBIC_ALPHA, cubic_exclude=0))


@register_lowering("aten::add.Tensor")
def lower_add_with_alpha(ctx: RuleContext, node: torch.fx.Node):
    """add(a, b, alpha) -> a + alpha * b; TVM 0.27's importer drops alpha (it reads args only).

    merge-tokens' prop_attn writes ``softmax(log(s) + c * l)`` as ``add(log(s), l, alpha=c)``; without
    this rule the scale c was lost.  Adds without alpha go to the importer's own converter.
    """
    return _with_alpha(ctx, node, "add")


@register_lowering("aten::sub.Tensor")
def lower_sub_with_alpha(ctx: RuleContext, node: torch.fx.Node):
    """sub(a, b, alpha) -> a - alpha * b (the importer drops alpha here too)."""
    return _with_alpha(ctx, node, "subtract")


def _with_alpha(ctx: RuleContext, node: torch.fx.Node, op: str):
    import operator

    from tvm import relax

    relax_op = getattr(relax.op, op)
    alpha = node.kwargs.get("alpha", 1)
    if alpha == 1:
        return ctx.importer._binary_op(relax_op, operator.add if op == "add" else operator.sub)(node)
    lhs, rhs = ctx.args(node)[:2]
    if not isinstance(lhs, relax.Expr) or not isinstance(lhs.ty, relax.TensorType):
        raise LoweringError(f"{op_name(node.target)} with alpha={alpha} at node {node.format_node()}: the TVM "
                            f"rule needs a tensor first operand; rewrite it without alpha before compiling")
    dtype = str(lhs.ty.dtype)
    if isinstance(rhs, relax.Expr) and _elements(lhs) < _elements(rhs):
        lhs = _materialized(ctx, lhs)
    if isinstance(rhs, relax.Expr):
        scaled = ctx.bb.emit(relax.op.multiply(rhs, relax.const(alpha, str(rhs.ty.dtype))))
    else:
        scaled = relax.const(alpha * rhs, dtype)
    return ctx.bb.emit(relax_op(lhs, scaled))


def _elements(expr) -> int:
    """Product of the static dims (a symbolic batch is common to both operands)."""
    count = 1
    for dim in expr.ty.shape.values:
        count *= int(dim.value) if hasattr(dim, "value") else 1
    return count


def _materialized(ctx: RuleContext, expr):
    """`expr` computed into its own buffer: an opaque copy that FuseOps does not fuse through.

    prop_attn's bias is log(s) broadcast (B, 1, 1, N) over (B, H, N, N) logits; fused into the add,
    the scalar log ran H * N times per value (about 1 ms a block at batch 64 on vit-mnist).
    """
    from tvm import te

    copy = ctx.emit_te(lambda x: te.compute(x.shape, lambda *index: x(*index), name="copy"), expr,
                       name="fxpress_materialize")
    global_var = ctx.bb.lookup_binding(copy).args[0]
    ctx.bb.update_func(global_var, ctx.bb.get()[global_var].with_attr("op_pattern", OPAQUE))
    return copy
