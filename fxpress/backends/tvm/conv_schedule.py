"""Direct convolution on llvm: conv2d in NHWC without an im2col copy.

The llvm pipeline converts conv2d to NHWC activations and HWIO weights (``ConvertLayout``,
see :mod:`.pipeline`); the weight transpose is a function of the parameter alone, so
``LiftTransformParams`` runs it once at load time, and consecutive convolutions, batch
norms, activations and pools stay NHWC between them (the transposes at the ends are small
elementwise kernels).  In that layout a convolution

    Y[n, y, x, f] += P[n, y*s + ry*d, x*s + rx*d, c] * W[ry, rx, c, f]

(``P`` the zero-padded input, a cheap vectorized copy) is a matrix product whose B operand
``W[ry, rx, c, :]`` is contiguous along the output channels and whose A operand is one
input value per output pixel.  :class:`DirectConv` keeps a tile of ``pixels x f-vectors``
accumulators in registers while ``ry, rx, c`` run innermost: per step it loads ``vectors``
weight vectors and broadcasts ``pixels`` input values for ``pixels * vectors`` FMAs, reading
the input where it lies (the strided and dilated windows are plain index arithmetic).
Before this rule a conv ran as an implicit GEMM through :class:`.schedules.Matmul`: a
per-call im2col copy with a bounds check per element, a per-call weight transpose and a
scattered NCHW write-back; cnn-digits' 3x3 convs reached 6-7 GMAC/s that way.

Grouped convolutions take the same schedule.  Depthwise (one input channel per group,
``Y[n, y, x, f] += P[n, .., .., f] * W[ry, rx, 0, f]``) reads a vector of inputs where the
dense case broadcasts one; other groups keep a vector inside a group's output channels, so
its input channel stays one broadcast value.

An epilogue that reads the output at plain indices (a bias, an activation) is computed from
the tile's registers; others stay a vectorized loop nest of their own.

Two shapes need more than the tile.  Output channels that are not a multiple of the vector
(the rank-7/10/11 factors ``low-rank`` makes) would run on fewer lanes, down to one:
:class:`PadConvChannels` (a Relax rewrite before ``LiftTransformParams``) zero-pads the weight
to whole vectors at load time and slices the output (with AVX-512's 16 lanes, to multiples of 8:
:func:`pad_unit`).  A head with fewer output channels than half that unit (a depth map or an
image: 1-3 channels) puts the lanes over the input channels
instead: each lane sums its own channels (``rfactor``) for a row of pixels held in registers,
and the lanes are added per tile (:meth:`DirectConv._schedule_channel_sums`).
"""
from __future__ import annotations

import logging

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from fxpress.backends.tvm.schedule_utils import (cpu_main_reduction, extent, rewrite_relax_functions, round_up,
                                                 vector_bits, vector_lanes)
from fxpress.backends.tvm.schedules import (ACCUMULATORS, _inline_plain_epilogue, _schedule_copy, _uses,
                                            _vectorize_innermost, register_budget)

log = logging.getLogger(__name__)

ANNOTATION = "fxpress.schedule"
MAX_PIXELS = 12  # the widest pixel tile (unrolled) of full-width vectors
MAX_HALF_PIXELS = 16  # of half-width ones (8 output channels on AVX-512)
MAX_VECTORS = 4  # the widest channel tile, in vectors


# -- Relax: ragged output channels get whole vectors -----------------------------------------------

def pad_unit(lanes: int) -> int:
    """Output channels a ragged conv is padded to a multiple of: the vector, or with 16 lanes
    (AVX-512) half of it: an 8-channel tile runs 256-bit vectors and never more padding (rank 7 -> 8,
    not 16).  On znver4, which splits 512-bit FMAs, a 32 -> 8 channel tile computes its MACs at 66-86% of
    a 16-channel one's rate (35-50 against 52-58 GMAC/s on different days; docs/lowrank.md), far better
    than twice the MACs."""
    return lanes // 2 if lanes >= 16 else lanes


@relax.expr_functor.mutator
class _PadChannelsMutator(relax.PyExprMutator):
    """``conv2d(x, W)`` (NHWC, HWIO, one group) with F output channels not a multiple of :func:`pad_unit` ->
    ``strided_slice(conv2d(x, pad(W to F')), F)``: W's zero padding depends on the weight alone (lifted to
    load time); F' - F extra channels of FMAs buy vector code for all F."""

    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.unit = pad_unit(lanes)
        self.padded = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.nn.conv2d":
            return call
        attrs = call.attrs
        if (str(attrs.data_layout), str(attrs.kernel_layout), int(attrs.groups)) != ("NHWC", "HWIO", 1):
            return call
        shape = getattr(call.args[1].ty, "shape", None)
        values = getattr(shape, "values", None)
        if values is None or len(values) != 4 or not isinstance(values[3], tirx.IntImm):
            return call
        channels = int(values[3])
        if channels % self.unit == 0 or channels <= self.unit // 2:
            return call  # whole vectors already, or a head the lane-sum schedule takes
        padded = round_up(channels, self.unit)
        bb = self.builder_
        weight = bb.emit(relax.op.nn.pad(call.args[1], [0, 0, 0, 0, 0, 0, 0, padded - channels]))
        conv = bb.emit(_conv2d_like(call, call.args[0], weight))
        self.padded += 1
        return relax.op.strided_slice(conv, [3], [0], [channels], assume_inbound=True)


@tvm.transform.module_pass(opt_level=0, name="fxpress.PadConvChannels")
class PadConvChannels:
    """Dense NHWC convs with ragged output channels compute whole vectors (see :class:`_PadChannelsMutator`).

    Without it a rank-11 conv that ``low-rank`` made ran with one lane (gdnet-lite after
    ``low-rank{energy=0.94}``: 13.5 ms compiled against 5.7 ms dense).  Runs after ``ConvertLayout``
    and before ``LiftTransformParams``.
    """

    def __init__(self, target: Target):
        self.lanes = max(vector_bits(target) // 32, 1)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator = _PadChannelsMutator(mod, self.lanes)
        mod = rewrite_relax_functions(mod, mutator, lambda: mutator.padded)
        log.debug("padded the output channels of %d convolutions", mutator.padded)
        return mod


# Copies whose output a conv's zero padding can be computed in: FuseOps joins an injective producer and
# the pad after it into one kernel.
_COPY_OPS = ("relax.concat", "relax.image.resize2d", "relax.permute_dims")


@relax.expr_functor.visitor
class _UseCounter(relax.PyExprVisitor):
    """How many times each variable of a function is read."""

    def __init__(self):
        super().__init__()
        self.uses: dict = {}

    def visit_var_(self, var: relax.Var) -> None:
        self.uses[var] = self.uses.get(var, 0) + 1

    def visit_dataflow_var_(self, var: relax.DataflowVar) -> None:
        self.uses[var] = self.uses.get(var, 0) + 1


@relax.expr_functor.mutator
class _PadInProducerMutator(relax.PyExprMutator):
    """``conv2d(copy(..), padding=p)`` (NHWC), where the copy (a concat, a resize, a layout transpose) is read
    by the conv alone -> ``conv2d(pad(copy(..)), padding=0)``: the pad joins the copy's kernel, and the conv,
    with nothing left to pad, reads its input in place (:func:`_schedule_padding`).  One copy where there
    were two: the producer's and the conv's ``pad_temp``."""

    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.uses: dict = {}
        self.moved = 0

    def prepare(self, func: relax.Function) -> bool:
        counter = _UseCounter()
        counter.visit_expr(func)
        self.uses = counter.uses
        return True

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        original = call
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.nn.conv2d" or str(call.attrs.data_layout) != "NHWC":
            return call
        padding = [int(p) for p in call.attrs.padding]
        source = original.args[0]
        producer = self.lookup_binding(call.args[0]) if isinstance(call.args[0], relax.Var) else None
        if (not any(padding) or getattr(getattr(producer, "op", None), "name", "") not in _COPY_OPS
                or self.uses.get(source, 0) != 1):
            return call
        top, left, bottom, right = padding
        bb = self.builder_
        padded = bb.emit(relax.op.nn.pad(call.args[0], [0, 0, top, bottom, left, right, 0, 0]))
        self.moved += 1
        return _conv2d_like(call, padded, call.args[1], padding=[0, 0, 0, 0])


def _conv2d_like(call: relax.Call, data, weight, padding=None) -> relax.Expr:
    """``relax.nn.conv2d(data, weight)`` with `call`'s attributes (its padding unless given)."""
    attrs = call.attrs
    out_layout = str(attrs.out_layout) if attrs.out_layout is not None else None
    out_dtype = attrs.out_dtype if str(attrs.out_dtype) not in ("", "void") else None
    return relax.op.nn.conv2d(data, weight, attrs.strides, attrs.padding if padding is None else padding,
                              attrs.dilation, int(attrs.groups), str(attrs.data_layout), str(attrs.kernel_layout),
                              out_layout, out_dtype)


@tvm.transform.module_pass(opt_level=0, name="fxpress.PadInProducer")
class PadInProducer:
    """A conv's zero padding computed in the kernel that makes its input (see :class:`_PadInProducerMutator`).

    gdnet-lite concatenates two 16-channel feature maps before each of its 32-channel convs: the
    concatenation wrote 4.2 MB at batch 8, and the conv's padding copied it again.  Runs after
    ``ConvertLayout``.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator = _PadInProducerMutator(mod)
        mod = rewrite_relax_functions(mod, mutator, lambda: mutator.moved, mutator.prepare)
        log.debug("moved the padding of %d convolutions into their producers", mutator.moved)
        return mod


# -- TIR: the schedule ------------------------------------------------------------------------------

def _is_var(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _conv_pattern(stmt) -> tuple[str, int] | None:
    """(kind, channels a vector may span) when the block is an NHWC convolution update, else None.

    Block variables n, y, x, f (spatial) and ry, rx, c (reduction); it writes ``Y[n, y, x, f]``,
    reads the weight at ``[ry, rx, c, f]`` and the input at ``[n, .. y .. ry, .. x .. rx, ch]``
    with ``ch = c`` ('dense'), ``ch = f + c`` with one input channel per group ('depthwise', TOPI's
    form) or ``ch = f // og * og + c`` ('grouped': a vector must stay inside a group of og output
    channels, so its input channel is one broadcast value).
    """
    ivs = list(stmt.iter_vars)
    kinds = "".join("S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in ivs)
    if kinds != "SSSSRRR" or len(stmt.writes) != 1:
        return None
    v = [iv.var for iv in ivs]
    out = stmt.writes[0]
    if len(out.region) != 4 or not all(isinstance(r.extent, tirx.IntImm) and r.extent.value == 1
                                       for r in out.region):
        return None
    if not all(_is_var(r.min, var) for r, var in zip(out.region, v[:4])):
        return None
    reads = [r for r in stmt.reads if not r.source.same_as(out.source)]
    if len(reads) != 2 or any(len(r.region) != 4 for r in reads):
        return None
    data, weight = reads
    d, w = [r.min for r in data.region], [r.min for r in weight.region]
    if not (_is_var(d[0], v[0]) and _uses(d[1], v[1]) and _uses(d[1], v[4]) and _uses(d[2], v[2])
            and _uses(d[2], v[5]) and all(_is_var(a, b) for a, b in zip(w, (v[4], v[5], v[6], v[3])))):
        return None
    channels = stmt.writes[0].source.shape[3]
    in_channels, per_group = data.source.shape[3], ivs[6].dom.extent
    if not all(isinstance(e, tirx.IntImm) for e in (channels, in_channels, per_group)):
        return None
    channels, groups = int(channels), int(in_channels) // int(per_group)
    if _is_var(d[3], v[6]):
        return ("dense", channels) if groups == 1 else None
    if not (_uses(d[3], v[6]) and _uses(d[3], v[3])):
        return None
    if int(per_group) == 1 and groups == channels:
        return "depthwise", channels
    return "grouped", channels // groups


def _is_plain_copy(stmt) -> bool:
    """``out[i...] = in[i...]``: TOPI's pad_temp of a conv without padding (a 1x1, a 'valid' conv)."""
    body = stmt.body
    return (isinstance(body, tirx.BufferStore) and isinstance(body.value, tvm.ir.expr.TensorLoad)
            and len(body.indices) == len(body.value.indices)
            and all(a.same_as(b) for a, b in zip(body.indices, body.value.indices)))


def _schedule_padding(sch: s_tir.Schedule, main, lanes: int) -> None:
    """The zero-padded input (the conv's producer): a parallel copy, vectorized along the channels.
    Without padding it is a plain copy of the input, which the tiles read directly instead
    (low-rank's 1x1 factors copied their whole input first)."""
    for producer in sch.get_producers(main):
        if _is_plain_copy(sch.get(producer)):
            try:
                sch.compute_inline(producer)
                continue
            except Exception as err:  # noqa: BLE001 - not inlinable: copied like a padding
                log.debug("conv input copy kept: %s", err)
        _schedule_copy(sch, producer)
        _vectorize_innermost(sch, producer, lanes)


def _reduce_channels(sch: s_tir.Schedule, main, target: Target) -> bool:
    """Output channels too few for a vector (under half the padding unit: 1-3), input channels a
    multiple of the lanes."""
    lanes = vector_lanes(target, sch.get(main))
    *_, f, _, _, rc = sch.get_loops(main)
    channels, inputs = extent(sch, f), extent(sch, rc)
    return (isinstance(channels, int) and isinstance(inputs, int) and lanes >= 4
            and channels < pad_unit(lanes) // 2 and inputs % lanes == 0)


def conv_tile(width, channels, lanes: int, span: int | None = None) -> tuple[int, int, int] | None:
    """(pixels, vectors, vector width) of the accumulator tile, or None when nothing fits.

    The vector width is the SIMD lanes when they divide `span` (the output channels, or a
    group's), else the largest divisor of it below them (a 1-channel output: scalar code).  Pixels
    divide the output width (no partial tile, so no predicate in the unrolled update); among
    tiles that fit the registers, the fewest step cycles per FMA win, as
    :func:`.schedules.register_tile` counts them.  A vector of half the lanes (low-rank's rank-8
    factors on AVX-512) takes up to 16 pixels: its FMAs issue two a cycle where full ones issue one
    (znver4), so 8 pixels left the loop's own instructions a larger share (32 -> 8 channels, 3x3:
    48.6 -> 50.1 GMAC/s; 16 pixels of full vectors were slower, 55.9 -> 52.1).
    """
    if not isinstance(width, int) or not isinstance(channels, int):
        return None
    span = channels if span is None else span
    vector = next((c for c in range(min(lanes, span), 0, -1) if span % c == 0 and channels % c == 0), 1)
    groups = channels // vector
    budget = register_budget(lanes)
    max_pixels = MAX_HALF_PIXELS if 2 * vector == lanes else MAX_PIXELS
    best, best_key = None, None
    for vectors in range(1, MAX_VECTORS + 1):
        if groups % vectors:
            continue
        for pixels in range(1, min(width, max_pixels) + 1):
            if width % pixels:
                continue
            accumulators = pixels * vectors
            if accumulators + vectors + 1 > budget:
                continue
            cycles = max(accumulators, pixels + vectors, ACCUMULATORS) / accumulators
            key = (round(cycles, 6), (pixels + vectors) / accumulators)
            if best_key is None or key < best_key:
                best, best_key = (pixels, vectors, vector), key
    return best


class DirectConv(ScheduleRule):
    """NHWC conv2d (dense, grouped, depthwise) as a register-tiled direct convolution (module doc)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = cpu_main_reduction(func, target, only=True)
        if found is None:
            return None
        sch, main = found
        pattern = _conv_pattern(sch.get(main))
        if pattern is None:
            return None
        name = func.attrs.get("global_symbol") if func.attrs else ""
        if pattern[0] == "dense" and _reduce_channels(sch, main, target):
            try:
                self._schedule_channel_sums(sch, main, target)
                return sch
            except Exception as err:  # noqa: BLE001 - a primitive refused: the plain tile below
                log.debug("channel-sum conv skipped %s: %s", name, err)
                sch, main = cpu_main_reduction(func, target, only=True)
        try:
            self._schedule(sch, main, *pattern, target)
        except Exception as err:  # noqa: BLE001 - a primitive refused: leave the function to the other rules
            log.debug("direct conv skipped %s: %s", name, err)
            return None
        return sch

    @staticmethod
    def _schedule_channel_sums(sch: s_tir.Schedule, main, target: Target) -> None:
        """Few output channels (a depth or image head: 1-3): vector lanes over the input channels.

        Each lane sums its own input channels (``rfactor``) for a row of pixels kept in registers;
        the lanes are added per tile at the end.  With the output channels as lanes, one channel
        was scalar code (gdnet-lite's last conv, 16 -> 1 channels: 0.44 GMAC/s).
        """
        lanes = vector_lanes(target, sch.get(main))
        _schedule_padding(sch, main, lanes)
        n, y, x, f, ry, rx, rc = sch.get_loops(main)
        width, channels = extent(sch, x), extent(sch, f)
        pixels = max(p for p in range(1, MAX_PIXELS + 1) if width % p == 0 and p * channels <= MAX_PIXELS)
        x_out, x_in = sch.split(x, [None, pixels])
        rc_out, lane = sch.split(rc, [None, lanes])
        sch.reorder(n, y, x_out, ry, rx, rc_out, x_in, f, lane)
        outer = sch.fuse(n, y, x_out)
        partial = sch.rfactor(lane, factor_axis=4)  # partial[n, y, x, f, lane], in a loop nest of its own
        outer, ry, _, _, x_in, f, lane = sch.get_loops(partial)
        sch.parallel(outer)
        local = sch.cache_write(partial, 0, "global")
        sch.reverse_compute_at(local, outer, preserve_unit_loops=True)
        sch.reverse_compute_at(main, outer, preserve_unit_loops=True)  # the lane sums, per tile
        for consumer in sch.get_consumers(main):  # bias, scale: per tile, after the lane sums
            sch.reverse_compute_at(consumer, outer, preserve_unit_loops=True)
        sch.unroll(x_in)
        sch.unroll(f)
        sch.vectorize(lane)
        sch.annotate(partial, ANNOTATION, "conv-channel-sums")
        init = sch.decompose_reduction(partial, ry)
        _vectorize_innermost(sch, init, lanes)
        _vectorize_innermost(sch, local, lanes)

    @staticmethod
    def _schedule(sch: s_tir.Schedule, main, pattern: str, span: int, target: Target) -> None:
        lanes = vector_lanes(target, sch.get(main))
        n, y, x, f, *red = sch.get_loops(main)
        tile = conv_tile(extent(sch, x), extent(sch, f), lanes, span)
        if tile is None:
            raise ValueError("symbolic width or channels")
        pixels, vectors, vector = tile
        _schedule_padding(sch, main, lanes)
        x_out, x_in = sch.split(x, [None, pixels])
        f_out, f_vec, f_lane = sch.split(f, [None, vectors, vector])
        sch.reorder(n, y, f_out, x_out, *red, x_in, f_vec, f_lane)
        outer = sch.fuse(n, y, f_out, x_out)
        sch.parallel(outer)
        local = sch.cache_write(main, 0, "global")  # a stack array per tile, kept in registers by LLVM
        _inline_plain_epilogue(sch, local)
        sch.reverse_compute_at(local, outer, preserve_unit_loops=True)
        sch.unroll(x_in)
        sch.unroll(f_vec)
        if vector > 1:
            sch.vectorize(f_lane)
        sch.annotate(main, ANNOTATION, f"conv-{pattern}")
        init = sch.decompose_reduction(main, red[0])
        if vector > 1:
            _vectorize_innermost(sch, init, lanes)
        for block in [local, *sch.get_consumers(local)]:
            _vectorize_innermost(sch, block, lanes)


__all__ = ["DirectConv", "PadConvChannels", "conv_tile", "pad_unit"]
