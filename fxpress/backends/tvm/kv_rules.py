"""TVM lowering rule for ``fxpress::kv_dequantize`` (see :mod:`fxpress.ops.kv`): a packed KV-cache
body restored inside a compiled decode step.

One elementwise TE compute writes the (L, 1, H, S, D) float32 past: each output value reads its byte
of codes, shifts its code out, and applies its group's float16 scale and minimum.  S (the length of
`slots`) and the group count are symbolic, so one build serves a cache that grows; L, H, D, Tg are
static.
TVM's default elementwise schedule vectorizes it.
"""
from __future__ import annotations

import torch.fx

from fxpress.backends.tvm.rules import RuleContext, register_lowering, relax_shape, static_int


def _static(node: torch.fx.Node, value, what: str) -> int:
    return static_int(node, value, what, "only the number of token groups may be dynamic")


def dequantize_compute(codes, scale, low, slots, bits: int, group: int, layers: int, heads: int, head_dim: int,
                       per_channel: bool, tokens_per_group: int):
    """The TE compute (see the module doc)."""
    from tvm import te, tirx

    mask = tirx.const((1 << bits) - 1, "uint8")

    def code(byte, bitpos):
        return (byte >> (bitpos % 8).astype("uint8")) & mask

    def value(l, _one, h, s, d):
        g, t = s // tokens_per_group, s % tokens_per_group
        if per_channel:
            row = (l * heads + h) * head_dim + d
            q = code(codes[row, g, t * bits // 8], t * bits)
            sc, lo = scale[row, g], low[row, g]
        else:
            row = l * heads + h
            q = code(codes[row, g, t, d * bits // 8], d * bits)
            sc, lo = scale[row, g, t, d // group], low[row, g, t, d // group]
        return q.astype("float32") * sc.astype("float32") + lo.astype("float32")

    shape = (layers, 1, heads, slots.shape[0], head_dim)
    return te.compute(shape, value, name="kv_dequantize")


@register_lowering("fxpress::kv_dequantize")
def lower_kv_dequantize(ctx: RuleContext, node: torch.fx.Node):
    codes, scale, low, slots, bits, group, layers, heads, head_dim, per_channel = ctx.args(node)
    code_shape = relax_shape(codes)
    tokens_per_group = group if per_channel else _static(node, code_shape[2], "tokens per group")
    return ctx.emit_te(dequantize_compute, codes, scale, low, slots, int(bits), int(group), int(layers), int(heads),
                       int(head_dim), bool(per_channel), int(tokens_per_group), name="fxpress_kv_dequantize")

