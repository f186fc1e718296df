"""TVM lowering rules for ``fxpress::quantized_linear`` and ``fxpress::quantized_embedding``
(the packed group layout of :mod:`fxpress.ops.quant`).

Every stored form is one affine map per group: ``W[n, k] = s[n, g] * level(q[n, k]) + o[n, g]``
with ``level(q) = q`` or ``codebook[q]`` and ``g = k // group``; the offset ``o`` is ``-s * zero``
(integer zero points), the float offset itself (GGUF Q4_1's form), ``-s * 2^(bits-1)`` (symmetric)
or 0 (symmetric with a codebook).

A linear whose input is one row (a decode step) runs a pre-scheduled GEMV on the codes::

    qp[p, kb, c]   = codes of W[p*NB + c, kb*CPB : kb*CPB + CPB], CPB per byte     (uint8, load time)
    sp, op[p, g, c] = s, o of W[p*NB + c] in group g                             (float32, load time)
    part[p, g, c]  = sum_{k in g} x[k] * level(qp[p, k // CPB, c] >> F*(k % CPB) & mask)
    y[p*NB + c]    = sum_g sp[p, g, c] * part[p, g, c] + op[p, g, c] * xs[g] (+ bias),  xs[g] = sum_{k in g} x[k]

The repacks depend only on the stored planes, so ``LiftTransformParams`` runs them once at load
time; 2- and 4-bit codes stay packed (4 and 2 per byte along k, so the byte of one k step holds NB
columns side by side), 3-bit codes take a 4-bit field and 8-bit codes a byte (so does any code
whose group would end inside a byte).  A byte's codes are unpacked by constant int32 shifts in one
reduction step: TIR's index arithmetic is int64, and a shift by ``k % 2`` made 64-bit vector lanes.  Panels of NB output
columns run in parallel; in a panel, k runs innermost over the NB columns as vectors, the group's
partial sums stay in registers, and the scale and offset are applied once per group.

A linear with more rows (a prefill, a batch) dequantizes W to float32 and runs the float matmul
schedules; that dequantization also depends only on the planes and is lifted to load time, so a
module with such linears holds the float weights beside the codes (the decode graph, whose linears
all have one row, holds only the codes).  ``quantized_embedding`` reads each looked-up row's codes
directly: the table stays packed.

The GEMV schedule is for CPUs (llvm, aarch64); the rules are registered for those targets.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import torch.fx

from fxpress.backends.tvm.rules import RuleContext, register_lowering, relax_shape, static_int
from fxpress.errors import LoweringError

PANEL_COLUMNS = (32, 24, 16, 8)  # NB candidates: output columns per panel (4 AVX2 vectors at most)


@dataclass(frozen=True)
class QuantLayout:
    """Static facts of one packed weight (N, K) and how the GEMV repacks it."""

    rows: int  # N
    features: int  # K (x's last dim)
    padded: int  # Kp: groups * group
    bits: int
    group: int
    form: str  # "sym" | "int" | "float"
    codebook: bool

    @property
    def groups(self) -> int:
        return self.padded // self.group

    @property
    def field(self) -> int:
        """Bits of a code in the GEMV's byte: 2, 4 (3-bit codes too) or 8 (also when a group would
        end inside a byte)."""
        natural = 4 if self.bits == 3 else self.bits
        return natural if self.group % (8 // natural) == 0 else 8

    @property
    def per_byte(self) -> int:
        return 8 // self.field

    @property
    def panel(self) -> int:
        """NB: the widest candidate dividing N; else N itself when small, else 8 with the last panel padded."""
        return next((nb for nb in PANEL_COLUMNS if self.rows % nb == 0), self.rows if self.rows < 8 else 8)

    @property
    def panels(self) -> int:
        return math.ceil(self.rows / self.panel)


def _layout(node: torch.fx.Node, codes, scales, zeros, codebook, bits: int, group: int, features) -> QuantLayout:
    def static(value, what: str) -> int:
        return static_int(node, value, what, "the packed planes have static shapes")

    rows, _ = (static(v, "codes dim") for v in relax_shape(codes))
    groups = static(relax_shape(scales)[1], "group count")
    form = "sym" if zeros is None else "int" if str(zeros.ty.dtype) == "uint8" else "float"
    layout = QuantLayout(rows, static(features, "in_features"), groups * group, bits, group, form,
                         codebook is not None)
    if layout.features > layout.padded or layout.padded - layout.features >= group:
        raise LoweringError(f"fxpress::quantized_linear at node {node.format_node()}: {groups} groups of {group} "
                            f"do not cover K={layout.features}; the planes do not match the input")
    return layout


# -- the stored form, value by value ---------------------------------------------------------------
def stored_code(codes, n, k, bits: int):
    """Code k of row n in the little-endian bit stream (int32); 3-bit codes may span two bytes."""
    from tvm import tirx

    first = (k * bits) // 8
    shift = ((k * bits) % 8).astype("int32")
    low = codes[n, first].astype("int32")
    if 8 % bits == 0:
        return (low >> shift) & ((1 << bits) - 1)
    width = codes.shape[1]
    high = tirx.Select(first + 1 < width, codes[n, tirx.min(first + 1, width - 1)].astype("int32"), 0)
    return ((low | (high << 8)) >> shift) & ((1 << bits) - 1)


def level(code, codebook, dtype: str = "float32"):
    return codebook[code].astype(dtype) if codebook is not None else code.astype(dtype)


def group_offset(scales, zeros, n, g, layout: QuantLayout):
    """o[n, g] of the module doc (float32)."""
    from tvm import tirx

    scale = scales[n, g].astype("float32")
    if layout.form == "int":
        return -scale * zeros[n, g].astype("float32")
    if layout.form == "float":
        return zeros[n, g].astype("float32")
    return tirx.const(0.0, "float32") if layout.codebook else -scale * float(2 ** (layout.bits - 1))


def dequantize_compute(codes, scales, zeros, codebook, layout: QuantLayout):
    """W (N, K) float32."""
    from tvm import te

    def value(n, k):
        g = k // layout.group
        q = stored_code(codes, n, k, layout.bits)
        return scales[n, g] * level(q, codebook) + group_offset(scales, zeros, n, g, layout)

    return te.compute((layout.rows, layout.features), value, name="dequantize")


# -- the GEMV (one row) ----------------------------------------------------------------------------
def repack_codes(codes, layout: QuantLayout):
    """(P, ceil(Kp / CPB), NB) uint8: CPB codes of a column per byte, consecutive k in rising fields."""
    from tvm import te, tirx

    nb, per_byte = layout.panel, layout.per_byte

    def byte(p, kb, c):
        n = tirx.min(p * nb + c, layout.rows - 1)  # columns past N (a padded last panel) have scale 0
        value = tirx.const(0, "int32")
        for j in range(per_byte):
            k = kb * per_byte + j
            code = tirx.Select(k < layout.padded, stored_code(codes, n, tirx.min(k, layout.padded - 1), layout.bits), 0)
            value = value | (code << (layout.field * j))
        return value.astype("uint8")

    return te.compute((layout.panels, math.ceil(layout.padded / per_byte), nb), byte, name="quant_codes")


def repack_affine(scales, zeros, layout: QuantLayout):
    """(P, G, NB) scale and offset planes (0 for the columns of a padded last panel)."""
    from tvm import te, tirx

    nb = layout.panel
    shape = (layout.panels, layout.groups, nb)

    def padded(value):
        return lambda p, g, c: tirx.Select(p * nb + c < layout.rows, value(tirx.min(p * nb + c, layout.rows - 1), g),
                                           tirx.const(0.0, "float32"))

    scale = te.compute(shape, padded(lambda n, g: scales[n, g].astype("float32")), name="quant_scale")
    offset = te.compute(shape, padded(lambda n, g: group_offset(scales, zeros, n, g, layout)), name="quant_offset")
    return scale, offset


def gemv_compute(x, qp, sp, op, codebook, bias, layout: QuantLayout):
    """y (1, P, NB) from x (1, Kp) and the repacked planes (see the module doc)."""
    from tvm import te, tirx

    nb, g, per_byte = layout.panel, layout.group, layout.per_byte
    mask = (1 << layout.field) - 1
    kk = te.reduce_axis((0, g), "kk")
    xs = te.compute((1, layout.groups), lambda m, gi: te.sum(x[m, gi * g + kk], axis=kk), name="xs")

    kb = te.reduce_axis((0, g // per_byte), "kb")

    def codes_of_byte(m, p, gi, c):
        """x . level over the byte's codes: constant shifts, int32 (index arithmetic is int64, and an
        int64 shift would make 64-bit vector lanes)."""
        byte = qp[p, gi * (g // per_byte) + kb, c].astype("int32")
        terms = [x[m, gi * g + kb * per_byte + j] * level((byte >> tirx.const(layout.field * j, "int32")) &
                                                          tirx.const(mask, "int32"), codebook)
                 for j in range(per_byte)]
        return functools.reduce(operator.add, terms)

    part = te.compute((1, qp.shape[0], layout.groups, nb), lambda m, p, gi, c: te.sum(
        codes_of_byte(m, p, gi, c), axis=kb), name="part")
    gr = te.reduce_axis((0, layout.groups), "gr")
    acc = te.compute((1, qp.shape[0], nb), lambda m, p, c: te.sum(
        sp[p, gr, c] * part[m, p, gr, c] + op[p, gr, c] * xs[m, gr], axis=gr), name="acc")
    if bias is None:
        return acc
    return te.compute(acc.shape, lambda m, p, c: acc[m, p, c] + bias[te.min(p * nb + c, layout.rows - 1)].astype(
        "float32"), name="out")


def schedule_gemv(func, layout: QuantLayout):
    """Panels in parallel; per panel, groups outer, k inner over NB vectorized columns (see the module doc)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    acc, part = sch.get_sblock("acc"), sch.get_sblock("part")
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    final = blocks.get("out", acc)
    m, p, c = sch.get_loops(final)[:3]
    panel = sch.fuse(m, p)
    sch.parallel(panel)
    lanes = 8 if layout.panel % 8 == 0 else layout.panel
    if final is not acc:
        sch.set_scope(acc, 0, "global")  # a panel's NB sums: a stack array, registers after LLVM
        sch.compute_at(acc, panel, preserve_unit_loops=True)
        _vector_columns(sch, c, lanes)
    c_acc, gr = sch.get_loops(acc)[-2:]
    sch.reorder(gr, c_acc)
    sch.set_scope(part, 0, "global")
    sch.compute_at(part, gr, preserve_unit_loops=True)
    c_part, kb = sch.get_loops(part)[-2:]
    sch.reorder(kb, c_part)
    _vector_columns(sch, c_part, lanes)
    _vector_columns(sch, c_acc, lanes)
    for block, loop in ((part, kb), (acc, gr)):
        init = sch.decompose_reduction(block, loop)
        _vector_columns(sch, sch.get_loops(init)[-1], lanes)
    return sch.mod["main"]


def _vector_columns(sch, loop, lanes: int) -> None:
    """Vectorize a column loop in vectors of `lanes`, the vectors unrolled."""
    extent = int(sch.get(loop).extent)
    if extent > lanes and extent % lanes == 0:
        outer, loop = sch.split(loop, [None, lanes])
        sch.unroll(outer)
    sch.vectorize(loop)


def _emit(ctx: RuleContext, compute, inputs: dict, name: str):
    """emit_te of ``compute(**inputs)`` where None inputs stay None (TE takes tensors only)."""
    present = [key for key, value in inputs.items() if value is not None]

    def call(*tensors):
        return compute(**{**dict.fromkeys(inputs), **dict(zip(present, tensors))})

    return ctx.emit_te(call, *[inputs[key] for key in present], name=name)


# -- the rules -------------------------------------------------------------------------------------
@register_lowering("fxpress::quantized_linear")
def lower_quantized_linear(ctx: RuleContext, node: torch.fx.Node):
    """x @ W.T + bias: the codes' GEMV for one row, else float32 W (load time) and the float matmul."""
    from tvm import relax, te, tirx

    x, codes, scales, zeros, codebook, bias, bits, group = ctx.args(node)
    *lead, features = relax_shape(x)
    layout = _layout(node, codes, scales, zeros, codebook, int(bits), int(group), features)
    if str(x.ty.dtype) != "float32":
        raise LoweringError(f"fxpress::quantized_linear at node {node.format_node()}: float32 activations only, "
                            f"got {x.ty.dtype}")
    planes = {"codes": codes, "scales": scales, "zeros": zeros, "codebook": codebook}
    if not all(isinstance(d, tirx.IntImm) for d in lead) or math.prod(int(d) for d in lead) != 1:
        weight = _emit(ctx, lambda **a: dequantize_compute(**a, layout=layout), planes, "fxpress_quant_dequantize")
        out = ctx.bb.emit(relax.op.matmul(x, relax.op.permute_dims(weight, [1, 0])))
        return ctx.bb.emit(relax.op.add(out, bias)) if bias is not None else out
    qp = ctx.emit_te(lambda c: repack_codes(c, layout), codes, name="fxpress_quant_codes")
    affine = _emit(ctx, lambda scales, zeros: repack_affine(scales, zeros, layout), {"scales": scales, "zeros": zeros},
                   "fxpress_quant_affine")
    sp, op = ctx.bb.emit(relax.TupleGetItem(affine, 0)), ctx.bb.emit(relax.TupleGetItem(affine, 1))
    row = ctx.bb.emit(relax.op.reshape(x, [1, layout.features]))
    if layout.padded != layout.features:
        row = ctx.emit_te(lambda v: te.compute((1, layout.padded), lambda m, k: te.if_then_else(
            k < layout.features, v[m, te.min(k, layout.features - 1)], 0.0), name="pad"), row,
            name="fxpress_quant_pad")
    inputs = {"x": row, "qp": qp, "sp": sp, "op": op, "codebook": codebook, "bias": bias}
    out = ctx.emit_scheduled(lambda **a: gemv_compute(**a, layout=layout), inputs,
                             lambda f: schedule_gemv(f, layout), "fxpress_quant_gemv")
    out = ctx.bb.emit(relax.op.reshape(out, [1, layout.panels * layout.panel]))
    if layout.panels * layout.panel != layout.rows:
        out = ctx.bb.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[layout.rows]))
    return ctx.bb.emit(relax.op.reshape(out, [*lead, layout.rows]))


@register_lowering("fxpress::quantized_embedding")
def lower_quantized_embedding(ctx: RuleContext, node: torch.fx.Node):
    """Rows of W read from the packed table: out[i, d] = s * level(code(index[i], d)) + o."""
    from tvm import relax, te

    indices, codes, scales, zeros, codebook, bits, group, dim = ctx.args(node)
    layout = _layout(node, codes, scales, zeros, codebook, int(bits), int(group), int(dim))
    shape = relax_shape(indices)
    flat = ctx.bb.emit(relax.op.reshape(indices, [math.prod(shape) if all(hasattr(s, "value") for s in shape)
                                                  else -1]))

    def rows(index, codes, scales, zeros, codebook):
        def value(i, d):
            n = index[i].astype("int64")
            g = d // layout.group
            q = stored_code(codes, n, d, layout.bits)
            return scales[n, g] * level(q, codebook) + group_offset(scales, zeros, n, g, layout)

        return te.compute((index.shape[0], layout.features), value, name="quantized_rows")

    out = _emit(ctx, rows, {"index": flat, "codes": codes, "scales": scales, "zeros": zeros, "codebook": codebook},
                "fxpress_quant_embedding")
    return ctx.bb.emit(relax.op.reshape(out, [*shape, layout.features]))
