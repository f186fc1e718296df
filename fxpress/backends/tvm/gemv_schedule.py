"""Single-row matmuls on CPU: a linear at batch-1 decode, ``y[0, j] = sum_k x[0, k] * W[k, j]``.

The register-blocked :class:`~.schedules.Matmul` rule does not take them (dlight's index
maps find no row axis of extent 1) and dlight's ``cpu.GEMV`` schedules only weights read
along k, so they ran as naive loops.  Two parts:

- :class:`PackGemvWeights` (Relax, before ``LiftTransformParams``): a linear whose input
  has one row and whose weight is a parameter ``W (N, K)`` gets its weight as panels
  ``Wp (N/NB, K, NB)`` (``Wp[p, k, c] = W[p*NB + c, k]``) and becomes a matmul of the row
  with every panel.  The packing is weight-only, so it runs once at load time, and the
  matmul then streams each panel as one contiguous block (the ``(K, N)`` transpose read
  NB columns per row, a new 4 KiB page per k when N is large; see docs/backends.md).  A weight of
  ``LARGE_WEIGHT_BYTES`` or more under a linear of several static rows (a vocabulary head at
  prefill), or one of ``PANEL_MIN_BYTES`` or more under at most ``FEW_ROWS`` rows (an encoder at
  a few dozen tokens, which streams its weights from memory: :func:`_panels_pay`), is packed the
  same way, in panels as wide as the matmul's register tile, and the rows are multiplied with
  every panel (the :class:`~.schedules.Matmul` rule's batched form).  A weight broadcast to the
  batch of a batched matmul (torch's linear after attention) is packed once.  Over symbolic rows (a
  dynamic batch, which may be one image or 64) a float weight of ``PANEL_MIN_BYTES`` or more takes
  tile-wide panels too, and the product reads them in place (``y[.., j] = sum_k x[.., k]
  Wp[j / NB, k, j % NB]``), padded per item where :func:`~.schedules.pads_rows` pads the rows.
- :class:`GEMV` (TIR schedule rule): ``C[.., j] += x[.., k] * W[.., k, j]`` where x reads
  no output axis of extent > 1 and W is contiguous in j.  Column panels of ``NB`` run in
  parallel; k is split into SEGMENTS parts read side by side, each with its ``NB`` partial
  sums in a panel-local array (vector registers as far as they go) while k runs (NB/lanes independent FMA chains, one broadcast of
  ``x[k]`` per step); the segments are added and the panel written once, with any fused
  elementwise epilogue (a packed matmul has none: FuseOps stops at the reshape after it).  Elementwise producers of W (a weight that is not a parameter) are
  inlined into the update.  It takes the packed matmuls and unpacked single-row matmuls
  alike; it leaves matmuls with more than one row, a symbolic column count or W read
  along k to the other rules.  Its update block is annotated ``fxpress.schedule = "gemv"``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.sym.analyzer import Analyzer
from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumers, auto_inline_producers
from tvm.target import Target

from fxpress.backends.tvm.schedule_utils import (bound_call, cpu_main_reduction, multiply_add_reads,
                                                 rewrite_relax_functions, shape_values, vector_bits, vector_factor,
                                                 vector_lanes)

log = logging.getLogger(__name__)

ANNOTATION = "fxpress.schedule"
PANEL_COLUMNS = 64  # fp32 columns per panel: 4 cache lines of W per k (32 and 128 were slower here)
SEGMENTS = 2  # segments of k a panel reads side by side: two streams of W keep more loads in flight
MIN_SEGMENT_DEPTH = 64
LARGE_WEIGHT_BYTES = 16 << 20  # a linear of several rows takes its weight in panels from this size on
FEW_ROWS = 64  # ... and from PANEL_MIN_BYTES on when it has at most this many rows (_panels_pay)
PANEL_MIN_BYTES = 256 << 10


def panel_width(columns: int, lanes: int) -> int:
    """Output columns per panel: the widest multiple of `lanes` up to PANEL_COLUMNS that divides
    `columns`; else the widest divisor up to that width when it fills a vector (LLVM splits an odd
    vector width without a predicate); else whole vectors with a predicated last panel."""
    widest = max(PANEL_COLUMNS, lanes)
    for width in range(widest - widest % lanes, 0, -lanes):
        if columns % width == 0:
            return width
    divisor = max(d for d in range(1, min(columns, widest) + 1) if columns % d == 0)
    return divisor if divisor >= lanes or divisor == columns else widest - widest % lanes


# -- the weight layout (Relax) ---------------------------------------------------------------------

@relax.expr_functor.mutator
class _PackGemvMutator(relax.PyExprMutator):
    """``matmul(x, permute_dims(W))`` with one row in x (or few rows, or a large W; see :func:`_panels_pay`)
    and W a parameter -> matmul with W's panels."""

    def __init__(self, mod: tvm.IRModule, vector_bits: int):
        super().__init__(mod)
        self.vector_bits = vector_bits
        self.weights: list = []
        self.packed = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.matmul":
            return call
        plan = self._plan(call)
        if plan is None:
            return call
        x, weight, (columns, depth, width), padding = plan
        bb = self.builder_
        whole = -(-columns // width) * width
        if whole != columns:  # symbolic rows only: zero columns up to whole panels, sliced off the product
            weight = bb.emit(relax.op.nn.pad(weight, [0, whole - columns, 0, 0]))
        panels = bb.emit(relax.op.reshape(weight, (whole // width, width, depth)))
        panels = bb.emit(relax.op.permute_dims(panels, [0, 2, 1]))
        self.packed += 1
        if _static_shape(x) is None:
            return self._symbolic_rows_times_panels(x, panels, columns, padding)
        rows = math.prod(_static_shape(x)[:-1])
        out_dtype = call.attrs.out_dtype
        out_dtype = None if out_dtype is None or str(out_dtype) in ("", "void") else out_dtype
        if rows == 1:
            row = bb.emit(relax.op.reshape(x, (1, depth)))
            product = bb.emit(relax.op.matmul(row, panels, out_dtype=out_dtype))
            return relax.op.reshape(product, call.ty.shape)
        block = bb.emit(relax.op.reshape(x, (1, rows, depth)))  # broadcast over the panels, not copied
        product = bb.emit(relax.op.matmul(block, panels, out_dtype=out_dtype))  # (panels, rows, width)
        return relax.op.reshape(bb.emit(relax.op.permute_dims(product, [1, 0, 2])), call.ty.shape)

    def _unbroadcast(self, arg: relax.Expr, leading: bool) -> relax.Expr:
        """`arg` without a ``broadcast_to`` that changes nothing, or with `leading` (the weight) one that
        only adds leading dims to a matrix.

        torch's matmul of a 3-D activation with a transposed weight (MiniLM's attention output
        projection) arrives as a batched matmul of both operands broadcast to the batch, the weight
        lifted to one copy per batch row at load time."""
        binding = bound_call(self, arg, "relax.broadcast_to")
        if binding is None:
            return arg
        source, target = _static_shape(binding.args[0]), _static_shape(arg)
        if source is None or target is None:
            return arg
        if source == target or (leading and len(source) == 2 and target[-2:] == source):
            return binding.args[0]
        return arg

    def _symbolic_rows_times_panels(self, x, panels, columns: int, padding: tuple | None) -> relax.Expr:
        """``y[.., j] = sum_k x[.., k] Wp[j / NB, k, j % NB]`` over symbolic rows, written in place
        (the matmul rule tiles it as it tiles the transposed layout; unlike the static form of
        :meth:`visit_call_`, no transpose of the result follows).  Token rows that
        :func:`~.schedules.pads_rows` pads, T per item in x ``(n * T, K)`` or ``(n, T, K)``, are
        padded to T' here as :class:`~.schedules.PadMatmuls` pads a matmul's, and the product is
        sliced back; PadMatmuls then moves the bias add before the slice, into the product's epilogue.
        Panels padded with zero columns (N not a multiple of their width) lose those columns the same
        way.  padding: :meth:`_row_padding`'s (source, T, T'), or None."""
        bb = self.builder_
        if padding is None:
            product = bb.emit_te(_rows_times_panels, x, panels, primfunc_name_hint="matmul_panels")
            return _first_columns(bb, product, columns)
        from fxpress.backends.tvm.schedules import product_of_padded_rows

        source, tokens, padded = padding
        return product_of_padded_rows(bb, source, tokens, padded, len(shape_values(x)) == 2,
                                      lambda rows: bb.emit_te(_rows_times_panels, rows, panels,
                                                              primfunc_name_hint="matmul_panels"), columns)

    def _row_padding(self, x, columns: int):
        """(source (n, T, K), T, T') when x's T rows per item pad to T' (:func:`~.schedules.token_rows_to_pad`),
        x being ``source`` or its flattening ``(n * T, K)``; else None."""
        from fxpress.backends.tvm.schedules import token_rows_to_pad

        found = token_rows_to_pad(self, x, columns, max(self.vector_bits // 32, 1))
        shape = None if found is None else shape_values(found[0])
        if shape is None or len(shape) != 3 or not isinstance(shape[2], tirx.IntImm):
            return None
        source, tokens, padded, _flat = found
        return source, tokens, padded

    def _symbolic_rows_plan(self, x, weight, columns: int, depth: int, bits: int, lanes: int):
        """(x, W, (N, K, NB), padding) for a float linear over symbolic rows (a dynamic batch) whose weight is not
        small: :meth:`_symbolic_rows_times_panels` multiplies the rows with its panels.

        A dynamic build cannot tell few rows from many.  With the transposed layout its linears streamed
        a large weight poorly at batch 1: a width-384 ViT at 50 tokens ran 1.33x its static build, whose
        few rows take panels (:func:`_panels_pay`).  The panels are as wide as the register tile of the
        rows (padded ones where :func:`~.schedules.pads_rows` pads them), so many rows lose nothing."""
        from fxpress.backends.tvm.schedules import register_tile

        found = _symbolic_rows(x)
        if found is None or columns * depth * bits // 8 < PANEL_MIN_BYTES or not str(x.ty.dtype).startswith("float") \
                or str(x.ty.dtype) != str(weight.ty.dtype):
            return None
        rows, factor = found
        padding = self._row_padding(x, columns)
        if padding is not None:
            source, _tokens, padded = padding
            rows, factor = shape_values(source)[0] * padded, padded
        width = register_tile(rows, columns, lanes, row_multiple=factor)[1]
        if width % lanes or width >= columns:
            return None
        return x, weight, (columns, depth, width), padding

    def _plan(self, call: relax.Call):
        """(x, W, (N, K, NB), padding) when the call is a linear this pass packs, else None; padding:
        :meth:`_row_padding`'s, for symbolic rows only."""
        x, transposed = self._unbroadcast(call.args[0], False), self._unbroadcast(call.args[1], True)
        binding = bound_call(self, transposed, "relax.permute_dims")
        if binding is None:
            return None
        weight = binding.args[0]
        axes = binding.attrs.axes
        if not any(weight.same_as(w) for w in self.weights) or axes is None or [int(a) for a in axes] != [1, 0]:
            return None
        x_shape, w_shape = _static_shape(x), _static_shape(weight)
        if w_shape is None or len(w_shape) != 2:
            return None
        columns, depth = w_shape
        bits = tvm.DataType(str(weight.ty.dtype)).bits
        lanes = max(self.vector_bits // bits, 1)
        if x_shape is None:
            out_dtype = call.attrs.out_dtype
            if out_dtype is not None and str(out_dtype) not in ("", "void", str(x.ty.dtype)):
                return None
            return self._symbolic_rows_plan(x, weight, columns, depth, bits, lanes)
        rows = math.prod(x_shape[:-1])
        if rows == 1:
            width = panel_width(columns, lanes)
        elif _panels_pay(rows, columns * depth * bits // 8):  # panels as wide as the matmul's tile
            from fxpress.backends.tvm.schedules import register_tile

            width = register_tile(rows, columns, lanes)[1]
        else:
            return None
        if columns % width or width % lanes or width == columns:
            return None  # a ragged last panel, or one panel: the transposed layout is as good
        return x, weight, (columns, depth, width), None


def _rows_times_panels(x, panels):
    """The TE compute of :meth:`_PackGemvMutator._symbolic_rows_times_panels`."""
    from tvm import te

    *lead, depth = x.shape
    width = panels.shape[2]
    k = te.reduce_axis((0, depth), name="k")
    columns = panels.shape[0] * width
    return te.compute((*lead, columns), lambda *i: te.sum(x[(*i[:-1], k)] * panels[i[-1] // width, k, i[-1] % width],
                                                          axis=k), name="matmul_panels")


def _first_columns(bb: relax.BlockBuilder, product: relax.Var, columns: int) -> relax.Var:
    """`product` without the zero columns of a weight padded to whole panels."""
    shape = shape_values(product)
    if int(shape[-1]) == columns:
        return product
    return bb.emit(relax.op.strided_slice(product, [len(shape) - 1], [0], [columns], assume_inbound=True))


def _symbolic_rows(x) -> tuple | None:
    """(rows as a PrimExpr, their known constant factor) of `x` (.., K) with symbolic leading dims and
    a static K, else None."""
    from fxpress.backends.tvm.schedules import constant_factor

    values = shape_values(x)
    if values is None or len(values) < 2 or not isinstance(values[-1], tirx.IntImm):
        return None
    rows = values[0]
    for value in values[1:-1]:
        rows = rows * value
    return rows, constant_factor(Analyzer().simplify(rows))


def _panels_pay(rows: int, weight_bytes: int) -> bool:
    """A linear of several static rows takes its weight in panels when the weight is large (a vocabulary
    head), or when it is not small and the rows are few.  Few rows use each weight row a few times, so the
    matmul streams the weight from memory: from the transposed ``(K, N)`` layout a tile reads its NR
    columns of a row, a new 4 KiB page per k on wide layers, where a panel is one contiguous stream
    (MiniLM, 28 token rows, 0.6-2.4 MB weights: 0.79x the model's time).  Many rows reuse each
    weight row from cache, and the transpose of the panels' result would cost more than it saves."""
    return weight_bytes >= LARGE_WEIGHT_BYTES or (rows <= FEW_ROWS and weight_bytes >= PANEL_MIN_BYTES)


def _static_shape(expr) -> list[int] | None:
    values = shape_values(expr)
    if values is None or not all(isinstance(v, tirx.IntImm) for v in values):
        return None
    return [int(v) for v in values]


@tvm.transform.module_pass(opt_level=0, name="fxpress.PackGemvWeights")
class PackGemvWeights:
    """Single-row linears take their weight as column panels (see the module doc).

    Runs on functions with a ``num_input`` attribute (parameters after the inputs are weights),
    before ``LiftTransformParams``.
    """

    def __init__(self, target: Target):
        self.vector_bits = vector_bits(target)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator = _PackGemvMutator(mod, self.vector_bits)

        def weights_of(func) -> bool:  # parameters after the inputs are weights
            if not func.attrs or "num_input" not in func.attrs:
                return False
            mutator.weights = list(func.params[int(func.attrs["num_input"]):])
            return True

        mod = rewrite_relax_functions(mod, mutator, lambda: mutator.packed, weights_of)
        log.debug("packed the weights of %d single-row matmuls", mutator.packed)
        return mod


# -- the schedule (TIR) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class GemvPattern:
    """The loops of a single-row matmul block: outer loops (unit rows, panels or batches of W that
    the row is broadcast over), the output column loop (W's contiguous axis, static), the k loop."""

    outer: list
    column: object
    reduction: object
    columns: int
    depth: int | None  # k's extent when static


def match_gemv(sch: s_tir.Schedule, block) -> GemvPattern | None:
    """The loops of `block` when it is ``C[.., j] += x[.., k] * W[.., k, j]``: x reads no output axis
    of extent > 1, W is contiguous in a static j; else None."""
    stmt = sch.get(block)
    if not multiply_add_reads(stmt):
        return None
    pairs = _loop_of_each_iter(sch, block)
    if pairs is None or any(iv.iter_type not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce)
                            for iv, _ in pairs):
        return None
    reduce = [(iv, loop) for iv, loop in pairs if iv.iter_type == tirx.IterVar.CommReduce]
    wide = [iv.var for iv, _ in pairs if iv.iter_type == tirx.IterVar.DataPar and not _is_one(iv.dom.extent)]
    if len(reduce) != 1 or not wide:
        return None
    reads = [r for r in stmt.reads if not any(r.source.same_as(w.source) for w in stmt.writes)]
    vector = [r for r in reads if not any(_reads_var(r, v) for v in wide)]
    weight = [r for r in reads if all(_reads_var(r, v) for v in wide) and _reads_var(r, reduce[0][0].var)]
    if len(vector) != 1 or len(weight) != 1:
        return None
    innermost = weight[0].region[-1].min
    column = next(((iv, loop) for iv, loop in pairs if innermost.same_as(iv.var)), None)
    if column is None or not any(column[0].var.same_as(v) for v in wide):  # W[j, k]: read along k
        return None
    if not isinstance(column[0].dom.extent, tirx.IntImm):
        return None
    outer = [loop for iv, loop in pairs if iv.iter_type == tirx.IterVar.DataPar and iv is not column[0]]
    depth = reduce[0][0].dom.extent
    return GemvPattern(outer=outer, column=column[1], reduction=reduce[0][1], columns=int(column[0].dom.extent),
                       depth=int(depth) if isinstance(depth, tirx.IntImm) else None)


class GEMV(ScheduleRule):
    """Single-row matmul: parallel column panels, partial sums in registers, weights streamed once."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = cpu_main_reduction(func, target)
        if found is None:
            return None
        sch, main = found
        try:
            auto_inline_producers(sch, main)
            pattern = match_gemv(sch, main)
            if pattern is None:
                return None
            self._schedule(sch, main, pattern, vector_lanes(target, sch.get(main)))
        except Exception as err:  # noqa: BLE001 - a primitive refused: not this rule's pattern
            log.debug("gemv rule skipped %s: %s", func.attrs.get("global_symbol") if func.attrs else "", err)
            return None
        return sch

    @staticmethod
    def _schedule(sch: s_tir.Schedule, main, pattern: GemvPattern, lanes: int) -> None:
        if sch.get_producers(main):
            raise ValueError("a producer that cannot be inlined")
        partial = sch.cache_write(main, 0, "global")  # a panel's sums: a stack array, registers (see Matmul)
        auto_inline_consumers(sch, partial)
        width = panel_width(pattern.columns, lanes)
        panel, column = sch.split(pattern.column, [None, width])
        update, step = main, pattern.reduction
        segments = reduction_segments(pattern.depth)
        outer_loops = [*pattern.outer, panel]
        if segments > 1:
            segment, step = sch.split(pattern.reduction, [segments, None])
            positions = _positions(sch, sch.get_loops(main), [*outer_loops, column, segment, step])
            update = sch.rfactor(segment, 0)  # update[s, .., j] sums segment s; main adds the segments
            after = sch.get_loops(update)  # the same loop nest, as new loops
            [*outer_loops, column, segment, step] = [after[i] for i in positions]
            sch.reorder(*outer_loops, step, segment, column)
            sch.unroll(segment)
        else:
            sch.reorder(*outer_loops, step, column)
        outer = sch.fuse(*outer_loops)
        sch.parallel(outer)
        for block in ([main] if segments > 1 else []) + [partial]:
            sch.reverse_compute_at(block, outer, preserve_unit_loops=True)
        _vectorize_innermost(sch, partial, lanes)
        for epilogue in sch.get_consumers(partial):  # not inlinable: its own parallel vector loops
            loops = sch.get_loops(epilogue)
            if len(loops) > 1:
                sch.parallel(sch.fuse(*loops[:-1]))
            _vectorize_innermost(sch, epilogue, lanes)
        vector = min(lanes, width)
        if width % vector == 0 and width > vector:
            repeat, column = sch.split(column, [None, vector])
            sch.unroll(repeat)
        sch.vectorize(column)
        sch.annotate(update, ANNOTATION, "gemv")
        init = sch.decompose_reduction(update, step)
        sch.vectorize(sch.get_loops(init)[-1])


def _positions(sch: s_tir.Schedule, loops: list, wanted: list) -> list[int]:
    """The index of each of `wanted` in `loops`."""
    return [next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(w))) for w in wanted]


def reduction_segments(depth: int | None) -> int:
    """How many segments of k a panel reads at once (each its own contiguous stream and partial sums):
    SEGMENTS when they split a static k of at least MIN_SEGMENT_DEPTH each evenly, else 1."""
    if not isinstance(depth, int) or depth % SEGMENTS or depth // SEGMENTS < MIN_SEGMENT_DEPTH:
        return 1
    return SEGMENTS


def _vectorize_innermost(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    size = sch.get(loops[-1]).extent
    factor = vector_factor(int(size), lanes) if isinstance(size, tirx.IntImm) else None
    if factor:
        _, inner = sch.split(loops[-1], [None, factor])
        sch.vectorize(inner)


def _loop_of_each_iter(sch: s_tir.Schedule, block) -> list | None:
    """(iter var, loop) pairs when every block iter is bound to exactly one loop variable."""
    from tvm_ffi import get_global_func

    realize = get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    loops = [(sch.get(loop).loop_var, loop) for loop in sch.get_loops(block)]
    pairs = []
    for iv, value in zip(sch.get(block).iter_vars, realize.iter_values):
        loop = next((lp for var, lp in loops if value.same_as(var)), None)
        if loop is None:
            return None
        pairs.append((iv, loop))
    return pairs


def _is_one(expr) -> bool:
    return isinstance(expr, tirx.IntImm) and int(expr) == 1


def _reads_var(region, var) -> bool:
    return any(any(v.same_as(var) for v in tirx.analysis.undefined_vars(axis.min)) for axis in region.region)
