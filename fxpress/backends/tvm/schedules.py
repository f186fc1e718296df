"""Default CPU schedules for fused TIR functions, in the spirit of TVM's dlight rules.

Each rule takes a PrimFunc and returns a scheduled ``s_tir.Schedule`` or None
(not its pattern); ``ApplyDefaultSchedule`` tries them in order per function.

- :class:`Matmul`: any single-reduction ``C[s,i,j] += A[s,i,k] * B[s,k,j]``
  (dense, batched, attention QK^T and PV, conv2d as an implicit GEMM, with
  fused epilogues).  Normalized with dlight's index maps, then
  register-blocked: an ``MR x NR`` tile of C (:func:`register_tile`) lives in
  vector registers (rows unrolled, columns vectorized) while k runs
  innermost; ragged sizes are padded to whole tiles; B is packed to
  ``[s, k, j]`` when it is not already contiguous in j.
- :class:`~.gemv_schedule.GEMV` first: single-row matmuls (batch-1 decode linears).
- dlight's ``cpu.GEMV``, then :class:`~.reduction_schedule.RowReduction` (softmax, layer
  norm: dlight's ``cpu.Reduction`` with vectorized partial accumulators).
- :class:`Injective`: elementwise/transposes: outer loops fused and
  parallel, innermost vectorized.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.sym.analyzer import Analyzer
from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumers, auto_inline_producers, get_index_map
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

from fxpress.backends.tvm.reduction_schedule import accumulator_count
from fxpress.backends.tvm.schedule_utils import (bound_call, cpu_main_reduction, extent, has_root_block, is_cpu,
                                                 multiply_add_reads, pick_factor, rewrite_relax_functions, root_block,
                                                 round_up, shape_values, vector_lanes)

log = logging.getLogger(__name__)

ROWS = 4  # MR, NR = lanes * MAX_COLUMN_VECTORS: the register tile when none fits (not expected)
MAX_COLUMN_VECTORS = 2  # also the widest vector loop of copies and epilogues, in vectors
ACCUMULATORS = 16  # enough independent FMA chains for two FMA ports of 4-cycle latency
AVX2_LOAD_WEIGHT = 2  # measured: loads (A broadcasts, B vectors) cost twice an FMA in the AVX2 tile model


class Matmul(ScheduleRule):
    """Register-blocked matmul with packing and fused epilogue."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        found = cpu_main_reduction(func, target)
        if found is None:
            return None
        sch, main = found
        stmt = sch.get(main)
        if not multiply_add_reads(stmt) or get_index_map(stmt) is None:
            return None
        b_k_inner = _reads_k_innermost(stmt, 1)
        try:
            self._normalize(sch, main, b_k_inner)
            self._tile(sch, main, target)
        except Exception as err:  # noqa: BLE001 - a primitive refused: not this rule's pattern
            log.debug("matmul rule skipped %s: %s", func.attrs.get("global_symbol") if func.attrs else "", err)
            return None
        return sch

    @staticmethod
    def _normalize(sch: s_tir.Schedule, main, b_k_inner: bool) -> None:
        """Rewrite to C[S,I,J] += A[S,I,K] * B[S,K,J]; pack A/B where they are not plain reads."""
        had_producers = [bool(_producers_of_read(sch, main, i)) for i in (0, 1)]
        matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
        reindex_a = sch.reindex(main, ("read", 0))
        reindex_b = sch.reindex(main, ("read", 1))
        reindex_c = sch.reindex(main, ("write", 0))
        sch.transform_layout(reindex_a, ("write", 0), a_map)
        sch.transform_layout(reindex_b, ("write", 0), _transpose_last_two(b_map))
        sch.transform_layout(reindex_c, ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)
        for index, block in enumerate((reindex_a, reindex_b)):
            auto_inline_producers(sch, block)
            plain = not had_producers[index] and (index == 0 or not b_k_inner)
            if plain:
                sch.compute_inline(block)
            else:
                _schedule_copy(sch, block)
        auto_inline_consumers(sch, reindex_c)

    @staticmethod
    def _tile(sch: s_tir.Schedule, main, target: Target) -> None:
        lanes = vector_lanes(target, sch.get(main))
        batch, rows, cols, red = sch.get_loops(main)
        n_rows, row_multiple = extent(sch, rows), constant_factor(sch.get(rows).extent)
        row_tile, col_tile = register_tile(n_rows, extent(sch, cols), lanes, row_multiple=row_multiple)
        block = _row_block(n_rows, extent(sch, red), row_tile, row_multiple) \
            if extent(sch, batch) == 1 else None  # batched: padding rows copied A per batch
        row_pad = row_tile * (block or 1)  # whole blocks of whole row tiles
        padded = [1, _pad_to(n_rows, row_pad), _pad_to(extent(sch, cols), col_tile), 1]
        if padded[1:3] != [1, 1]:
            sch.pad_einsum(main, padded)  # producers/consumers get padding blocks; no predicated tail
            for producer in sch.get_producers(main):
                _schedule_copy(sch, producer)
                _vectorize_innermost(sch, producer, lanes)
            for strip in sch.get_consumers(main):  # the un-padding copy: fold the copies after it in
                auto_inline_consumers(sch, strip)
        batch, rows, cols, red = sch.get_loops(main)
        r_out, r_in = sch.split(rows, [None, row_tile])
        c_out, c_in = sch.split(cols, [None, col_tile])
        if block:  # A's rows in L2-sized blocks, every column panel over a block before the next one
            r_blk, r_sub = sch.split(r_out, [None, block])
            sch.reorder(batch, r_blk, c_out, r_sub, red, r_in, c_in)
            outer = sch.fuse(batch, r_blk, c_out, r_sub)
        else:
            sch.reorder(batch, c_out, r_out, red, r_in, c_in)  # a B panel stays in cache across row tiles
            outer = sch.fuse(batch, c_out, r_out)
        sch.parallel(outer)
        local = sch.cache_write(main, 0, "global")  # "local" cost a workspace alloc/free per tile; a small
        # "global" tile under the parallel loop becomes a stack array, kept in registers by LLVM
        if padded[1:3] == [1, 1]:  # a padded tile would write its padding past the output
            _inline_plain_epilogue(sch, local)
        sch.reverse_compute_at(local, outer, preserve_unit_loops=True)
        if padded[1:3] == [1, 1] or not _strip_per_tile(sch, local, outer):
            _vectorize_innermost(sch, local, lanes)
            for consumer in sch.get_consumers(local):
                # a padded C's epilogue stays a separate pass: per tile it wrote past the output
                _epilogue_per_tile(sch, consumer, outer, lanes, row_tile * col_tile if padded[1:3] == [1, 1] else 0)
        Matmul._vectorize_update(sch, main, red, r_in, c_in, lanes, col_tile)

    @staticmethod
    def _vectorize_update(sch: s_tir.Schedule, main, red, r_in, c_in, lanes: int, col_tile: int) -> None:
        v_out, v_in = sch.split(c_in, [None, min(lanes, col_tile)])
        sch.unroll(r_in)
        sch.unroll(v_out)
        sch.vectorize(v_in)  # before decompose_reduction: the update alone fails the dataflow check
        init = sch.decompose_reduction(main, red)
        _vectorize_innermost(sch, init, lanes)


A_BLOCK_BYTES = 192 * 1024  # the rows of A one block of column panels reads: well inside a 512 KB L2


def _row_block(rows, depth, row_tile: int, row_multiple: int = 1) -> int | None:
    """Row tiles per L2 block of A, or None when A fits or no block helps.

    Column panels run outermost so a B panel stays in cache across row tiles; when A is larger than
    L2 each panel streamed all of A from memory again (a width-384 ViT at batch 64 x 197 tokens:
    12,608 x 384 floats, 19 MB, read 72 times by its QKV matmul).  Static rows: the block between
    half and all of ``A_BLOCK_BYTES`` that pads the row tiles least; rows are padded to whole blocks
    (12,608 rows in tiles of 6 are 2,102 tiles, which only blocks of 2 divided: B was streamed
    again every 12 rows).  Rows that are whole tiles, and symbolic rows whose known factor
    (``row_multiple``: a dynamic batch of 184-token rows) the tile divides, take a block that divides
    the tiles (or that factor's tiles) if one lies between half and all of the budget, else a partial
    last block (:func:`_whole_or_partial_block`).  Without a block, the QKV and feed-forward matmuls of a
    width-192 ViT at batch 64 x 197 tokens (1,576 tiles of 8, which no block of 16-32 divides) streamed A
    again for each column panel (26 GMAC/s, against 45 with blocks), and so did a merged width-384 ViT's
    dynamic build over 184 tokens (23 tiles of 8 per image): 27 GMAC/s, 42 with partial blocks.
    """
    if not isinstance(depth, int):
        return None
    target = max(A_BLOCK_BYTES // (4 * depth * row_tile), 1)
    if not isinstance(rows, int):
        if row_multiple % row_tile:
            return None
        return _whole_or_partial_block(row_multiple // row_tile, target, symbolic=True)
    tiles = -(-rows // row_tile)
    if tiles * row_tile * depth * 4 <= 2 * A_BLOCK_BYTES:
        return None
    if rows % row_tile == 0:
        return _whole_or_partial_block(tiles, target)
    best = min(range(max(target // 2, 1), target + 1), key=lambda block: (round_up(tiles, block), -block))
    return best if 1 < best < tiles else None


def _whole_or_partial_block(tiles: int, target: int, symbolic: bool = False) -> int | None:
    """Row tiles per block for `tiles` whole row tiles (with `symbolic`, a known factor of their count).

    The largest block from half the `target` to all of it that divides them, else `target` with the last
    block partial: a predicate on the tile, outside the k loop, skips its missing tiles at no measurable
    cost, where padding the rows to whole blocks would compute them."""
    dividing = [block for block in range(max(target // 2, 2), target + 1) if tiles % block == 0]
    if dividing:
        return max(dividing)
    return target if target >= 2 and (symbolic or target < tiles) else None


def register_budget(lanes: int) -> int:
    """Vector registers a register tile (accumulators, B vectors, a broadcast) may take: 30 of the
    32 AVX-512 registers for 16 fp32 lanes, else 15 of 16 (AVX2's 6 x 2 tile uses 15)."""
    registers = 32 if lanes >= 16 else 16
    return registers - (2 if registers > 16 else 1)


def register_tile(n_rows, n_cols, lanes: int, row_multiple: int = 1) -> tuple[int, int]:
    """(rows, columns) of the C tile kept in vector registers while k runs.

    About 16 accumulators hide the FMA latency on two FMA ports; the tile plus one
    B vector per column vector and a broadcast A value must fit in 32 (AVX-512) or
    16 registers (AVX2: 6 rows x 2 vectors + 2 + 1 = 15, the classic Haswell kernel).
    A k step of the tile issues rows x vectors FMAs and rows + vectors loads (B
    vectors, A broadcasts) and takes at least the FMA latency times the ports
    (ACCUMULATORS); the tile with the fewest such step cycles over the padded work
    wins (a 50-column attention matmul pads to 64, a 14-column one to 16, rather than
    running scalar code).  On AVX2, MiniLM's feed-forward matmuls ran 1.4x faster
    with 6 x 2 than with the 10 x 1 a budget of 14 registers left, and attention scores (197 x 197 x 64
    per head, ViT batch 64) 1.5x faster with 6 x 2 than with the 12 x 1 that pads less: on AVX2 a
    load counts twice an FMA (``AVX2_LOAD_WEIGHT``), so one-vector tiles (13 loads per 12 FMAs) lose
    unless 6 x 2 would pad far more (8 columns).  A symbolic row count cannot be padded; when it
    is a known multiple (batch x 50 tokens: `row_multiple` 50) the row tile divides
    that multiple, so no row tile is partial and no predicate enters the update.
    """
    row_options = range(1, 13)
    if not isinstance(n_rows, int) and max(r for r in row_options if row_multiple % r == 0) >= 4:
        row_options = [r for r in row_options if row_multiple % r == 0]
    return _best_tile(n_rows, n_cols, lanes, row_options)[0]


def _best_tile(n_rows, n_cols, lanes: int, row_options) -> tuple[tuple[int, int], tuple | None]:
    """(the cheapest register tile with rows from `row_options`, its cost key): :func:`register_tile`."""
    budget = register_budget(lanes)
    col_options = [lanes * v for v in (1, 2, 3, 4)]
    best, best_cost = (ROWS, lanes * MAX_COLUMN_VECTORS), None
    for cols in col_options:
        vectors = max(cols // lanes, 1)
        for rows in row_options:
            accumulators = rows * vectors
            if accumulators + vectors + 1 > budget:
                continue
            work = _padded(n_rows, rows, 64) * _padded(n_cols, cols, 64)
            loads = (rows + vectors) * (AVX2_LOAD_WEIGHT if lanes < 16 else 1)
            step_cycles = max(accumulators, loads, ACCUMULATORS)  # FMAs, loads, FMA latency
            cost = work / accumulators * step_cycles
            # ties: less padding, then fewer loads (16 registers: AVX2; the AVX-512 choices are kept as measured)
            key = (cost, work, (rows + vectors) / accumulators) if lanes < 16 else (cost,)
            if best_cost is None or _better(key, best_cost):
                best, best_cost = (rows, cols), key
    return best, best_cost



def _better(key: tuple, best: tuple) -> bool:
    """Costs within 0.1% tie; then less padded work, then fewer loads per FMA."""
    if abs(key[0] - best[0]) > 0.001 * best[0]:
        return key[0] < best[0]
    return key[1:] < best[1:]


def _padded(size, tile: int, symbolic: int) -> int:
    return round_up(size if isinstance(size, int) else symbolic, tile)


def constant_factor(expr) -> int:
    """The largest constant known to divide `expr` (n * 50 -> 50; a constant -> itself)."""
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    return max(int(Analyzer().modular_set(expr).coeff), 1)


def _pad_to(size, tile: int) -> int:
    """The pad_einsum factor for a loop of `size` tiled by `tile` (1: divides, or symbolic)."""
    return tile if isinstance(size, int) and size % tile else 1


def _inline_plain_epilogue(sch: s_tir.Schedule, write_back) -> None:
    """Fold a bias/activation epilogue into the tile's write-back, so C is written once, from registers.

    Only when the epilogue reads C at plain block variables (``C[0, i, j]``): then the
    tile's rows and columns are its own, and computing it per tile reads nothing that
    is not computed yet (see :func:`_epilogue_per_tile` for the fused-rows case).  On
    vit-mnist at batch 64 the separate pass re-read and re-wrote a 2.4 MB output.  A chain
    (bias, then ReLU, then a residual add) is folded link by link, as long as each link is the
    only consumer: gdnet-lite's conv + bias + ReLU + skip wrote its output and re-read it twice
    more (a third of the conv's time).
    """
    while len(consumers := sch.get_consumers(write_back)) == 1:
        stmt = sch.get(consumers[0])
        written = sch.get(write_back).writes[0].source
        extents = {iv.var: iv.dom.extent for iv in stmt.iter_vars}
        reads = [r for r in stmt.reads if r.source.same_as(written)]
        if not reads or not all(_whole_axis(axis.min, size, extents)
                                for r in reads for axis, size in zip(r.region, written.shape)):
            break
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception as err:  # noqa: BLE001 - not an inlinable epilogue: it stays a separate loop nest
            log.debug("epilogue kept separate: %s", err)
            break


def _strip_per_tile(sch: s_tir.Schedule, write_back, outer) -> bool:
    """A padded tile: copy its valid part straight from registers to C, instead of through a
    padded C and a strip pass (on vit-mnist's 50x50 attention scores the two copies cost more
    than the FMAs).  Only when the strip reads the padded C at plain block variables, so the
    tile's rows are its own; False (schedule unchanged) otherwise."""
    strips = sch.get_consumers(write_back)
    if len(strips) != 1:
        return False
    stmt = sch.get(strips[0])
    padded = sch.get(write_back).writes[0].source
    block_vars = [iv.var for iv in stmt.iter_vars]
    reads = [r for r in stmt.reads if r.source.same_as(padded)]
    plain = all(isinstance(axis.min, tirx.IntImm) or any(axis.min.same_as(v) for v in block_vars)
                for r in reads for axis in r.region)
    if not reads or not plain:
        return False
    try:
        sch.reverse_compute_at(strips[0], outer, preserve_unit_loops=True)
    except Exception as err:  # noqa: BLE001 - keep the separate strip pass
        log.debug("strip kept separate: %s", err)
        return False
    sch.compute_inline(write_back)
    return True


def _whole_axis(index, size, extents: dict) -> bool:
    """`index` walks the whole axis of `size`: a block variable over exactly that extent, or 0 on a
    unit axis.  (An epilogue reading a slice of C must not be folded in: the tile would write the
    whole of it.)"""
    if isinstance(index, tirx.IntImm):
        return int(index) == 0 and isinstance(size, tirx.IntImm) and int(size) == 1
    for var, extent in extents.items():
        if index.same_as(var):
            return bool(Analyzer().can_prove(extent == size))
    return False


def _epilogue_per_tile(sch: s_tir.Schedule, consumer, outer, lanes: int, tile: int) -> None:
    """The epilogue (bias, GELU, a slice of padded token rows...) under the tile loop when it computes
    exactly the tile's `tile` elements there, else as its own parallel, vectorized loop nest.

    When the normalized rows fuse several output dims (a conv's n*h*w, a linear's batch*seq) and a
    tile straddles them, reverse_compute_at covers a bounding box larger than the tile and reads rows
    not yet computed (NaN on vit-mnist at batch 8): tried on a copy of the schedule first, it is kept
    only when the epilogue's loops under the tile span exactly the tile.  A dynamic batch of padded
    token rows (batch x 48, tiles of 6: :class:`PadMatmuls`) passes; on a width-192 ViT at batch 64
    that measured no faster than the separate pass.
    """
    if tile and _spans_the_tile(sch.copy(), consumer, outer, tile):
        sch.reverse_compute_at(consumer, outer, preserve_unit_loops=True)
    else:
        loops = sch.get_loops(consumer)
        if len(loops) > 1:
            sch.parallel(sch.fuse(*loops[:-1]))
    _vectorize_innermost(sch, consumer, lanes)


def _spans_the_tile(trial: s_tir.Schedule, consumer, outer, tile: int) -> bool:
    """Whether `consumer` moved under `outer` runs exactly `tile` iterations there.  Not when it
    has a predicate of its own (a slice of padded rows: ``T.where(v1 < 13)`` over 18 rows), which
    reverse_compute_at replaced by the tile's bounds, writing past the output."""
    loops = trial.get_loops(consumer)
    realize = trial.get(loops[-1]).body if loops else None
    predicate = getattr(realize, "predicate", None)
    if not (isinstance(predicate, tirx.IntImm) and int(predicate) == 1):
        return False
    try:
        trial.reverse_compute_at(consumer, outer, preserve_unit_loops=True)
    except Exception as err:  # noqa: BLE001 - not computable per tile
        log.debug("epilogue kept separate: %s", err)
        return False
    loops = trial.get_loops(consumer)
    anchor = trial.get(outer)
    position = next((i for i, loop in enumerate(loops) if trial.get(loop).same_as(anchor)), None)
    if position is None:
        return False
    extents = [extent(trial, loop) for loop in loops[position + 1:]]
    return all(isinstance(e, int) for e in extents) and math.prod(extents) == tile


def _reads_k_innermost(stmt, index: int) -> bool:
    reduce_vars = {iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    region = stmt.reads[index].region
    return any(_uses(region[-1].min, v) for v in reduce_vars)


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _producers_of_read(sch: s_tir.Schedule, block, index: int) -> list:
    buffer = sch.get(block).reads[index].source
    return [p for p in sch.get_producers(block) if any(w.source.same_as(buffer) for w in sch.get(p).writes)]


def _transpose_last_two(index_map: tirx.IndexMap) -> tirx.IndexMap:
    """(..) -> (s, j, k) becomes (..) -> (s, k, j): B packed contiguous along j."""
    final = list(index_map.final_indices)
    return tirx.IndexMap(index_map.initial_indices, final[:-2] + [final[-1], final[-2]], None)


def _schedule_copy(sch: s_tir.Schedule, block) -> None:
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))


def _vectorize_innermost(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    size = extent(sch, loops[-1])
    if isinstance(size, int) and size > 1:
        factor = pick_factor(size, [lanes * MAX_COLUMN_VECTORS, lanes, lanes // 2, lanes // 4, 2])
        if factor:
            _, inner = sch.split(loops[-1], [None, factor])
            sch.vectorize(inner)


class Injective(ScheduleRule):
    """All-spatial functions: outer loops fused and parallel, the innermost vectorized."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not is_cpu(target) or not has_root_block(func):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(root_block(sch))
        if any(iv.iter_type != tirx.IterVar.DataPar for b in blocks for iv in sch.get(b).iter_vars):
            return None
        for block in blocks[:-1]:
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - keep blocks that cannot be inlined
                pass
        for block in sch.get_child_blocks(root_block(sch)):
            loops = sch.get_loops(block)
            if len(loops) > 1:
                sch.parallel(sch.fuse(*loops[:-1]))
            _vectorize_innermost(sch, block, vector_lanes(target, sch.get(block)))
        return sch


# -- Relax: token rows of a dynamic batch pad to whole tiles -------------------------------------------

ROW_PAD = 6  # a padded token count is a multiple of 6: row tiles of 6 (AVX2), 12 and 8 (AVX-512 with 48)


def pads_rows(tokens: int, columns: int, lanes: int) -> bool:
    """Whether `tokens` rows per batch item pad to a multiple of ROW_PAD: when the register tiles dividing
    `tokens` cost more than those dividing the padded count over its padded rows (:func:`register_tile`'s
    cost).  47, 197 or 41 rows have no dividing tile of 4 rows or more; on AVX2 a 44-row feed-forward
    matmul of a width-192 ViT (tiles dividing 44) took 28 ms at batch 64, padded to 48 rows 16 ms.  With
    AVX-512's 30 registers 44 rows take an 11 x 2 tile and 50 a 10 x 2, which cost less than 48 and 54
    padded rows even before the pad and slice copies that padding adds."""
    padded = round_up(tokens, ROW_PAD)
    if padded == tokens:
        return False

    def cost(rows: int) -> float:
        return _best_tile(rows, columns, lanes, [r for r in range(1, 13) if rows % r == 0])[1][0]

    return cost(padded) < cost(tokens)


def token_rows_to_pad(mutator: relax.PyExprMutator, rows: relax.Expr, columns: int, lanes: int):
    """(x, T, T', flat) when `rows` are a dynamic batch of T token rows per item that :func:`pads_rows`
    pads to T' = ``round_up(T, ROW_PAD)`` for a matmul of `columns` columns: x ``(n, T, K)`` with a symbolic n itself (flat False), or behind
    the flattening ``reshape(x, (n * T, K))`` that `mutator` bound (flat True; x may then be
    ``(n, T, heads, head dim)``).  None otherwise.  :meth:`_PadMatmulMutator._token_rows` and the
    weight panels over a dynamic batch (:mod:`.gemv_schedule`) pad such rows."""
    reshaped = bound_call(mutator, rows, "relax.reshape") if len(shape_values(rows) or ()) == 2 else None
    x, flat = (rows, False) if reshaped is None else (reshaped.args[0], True)
    shape = shape_values(x)
    if shape is None or len(shape) < 3 or (len(shape) > 3 and not flat):
        return None
    batch, tokens = shape[:2]
    if isinstance(batch, tirx.IntImm) or not isinstance(tokens, tirx.IntImm) \
            or not pads_rows(int(tokens), columns, lanes):
        return None
    return x, int(tokens), round_up(int(tokens), ROW_PAD), flat


def product_of_padded_rows(bb: relax.BlockBuilder, x: relax.Expr, tokens: int, padded: int, flat: bool,
                           product, columns: int) -> relax.Expr:
    """`product` of x ``(n, T, K)`` with its T rows per item padded to T', back to T rows and to `columns`
    columns (a product of zero-padded weight panels has more), flattened to ``(n * T, columns)`` when
    `flat`.  product: the padded rows ``(n, T', K)`` -> a bound ``(n, T', N)``.  For
    :meth:`_PadMatmulMutator._token_rows` and the weight panels over a dynamic batch
    (:mod:`.gemv_schedule`), with :func:`token_rows_to_pad`'s (x, T, T', flat)."""
    rows = bb.emit(relax.op.nn.pad(x, [0, 0, 0, padded - tokens, 0, 0]))
    computed = product(rows)
    if int(shape_values(computed)[-1]) == columns:
        sliced = relax.op.strided_slice(computed, [1], [0], [tokens], assume_inbound=True)
    else:
        sliced = relax.op.strided_slice(computed, [1, 2], [0, 0], [tokens, columns], assume_inbound=True)
    if not flat:
        return sliced
    return relax.op.reshape(bb.emit(sliced), (shape_values(x)[0] * tokens, columns))


def _slice_axes(call: relax.Call, rank: int) -> set[int]:
    """The axes a ``strided_slice`` call slices, as non-negative ints."""
    return {int(getattr(axis, "value", axis)) % rank for axis in call.args[1]}


def _static_dims(expr) -> list | None:
    """`expr`'s shape with its last two dims as ints (the others as they are) when those are static, else None."""
    values = shape_values(expr)
    if values is None or len(values) < 2 or not all(isinstance(v, tirx.IntImm) for v in values[-2:]):
        return None
    return [*values[:-2], *(int(v) for v in values[-2:])]


def _is_scalar_constant(expr) -> bool:
    """A Relax constant with one element (a scale)."""
    return isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1


def _splits_in_vectors(columns: int, lanes: int) -> bool:
    """Whether a row reduction over `columns` splits into partial sums of whole vectors
    (:func:`.reduction_schedule.accumulator_count` a multiple of `lanes`).  184 columns split into 23
    partials of 8 elements, not vectors: a merged ViT's softmax ran 1.5x eager's."""
    count = accumulator_count(columns)
    return count is not None and count % lanes == 0


def _column_bias(call: relax.Call) -> int | None:
    """The index of the operand of an ``add`` that is a row of column biases, ``(.., 1, N)``, added to
    scores ``(.., R, N)`` of the same rank (ToMe's attention adds log(size) per key), else None."""
    dims = [_static_dims(arg) for arg in call.args]
    if any(d is None for d in dims) or len(dims[0]) != len(dims[1]):
        return None
    for index in (1, 0):
        bias, scores = dims[index], dims[1 - index]
        if bias[-2] == 1 and scores[-2] > 1 and bias[-1] == scores[-1] and _same_dims(scores, _static_dims(call)):
            return index
    return None


def _same_dims(first, second) -> bool:
    """Whether two lists of dims (IntImm or symbolic) are provably equal, dim by dim."""
    analyzer = Analyzer()
    return len(first) == len(second) and all(analyzer.can_prove_equal(a, b) for a, b in zip(first, second))


@relax.expr_functor.mutator
class _PadMatmulMutator(relax.PyExprMutator):
    """Matmuls whose rows or columns no register tile divides compute whole tiles of padded operands
    and slice the result: the linears of a dynamic batch of token rows (:meth:`_token_rows`) and
    attention matmuls with static ragged sizes (:meth:`_tiles`).  Over a symbolic batch, a linear's
    bias add also moves before the slice and the flattening reshape (:meth:`_bias_before_flatten`,
    :meth:`_merge_reshapes`), so fusion makes it the matmul's epilogue."""

    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.rewritten = 0
        self.padded_probabilities: dict = {}  # softmax over masked padded columns -> the valid column count

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        if name == "relax.add":
            return self._bias_before_flatten(call)
        if name == "relax.reshape":
            return self._merge_reshapes(call)
        if name == "relax.nn.softmax":
            return self._softmax_over_padded_columns(call)
        if name != "relax.matmul":
            return call
        padded = self._token_rows(call)
        if padded is None:
            padded = self._probabilities_times_values(call)
        if padded is None:
            padded = self._tiles(call)
        if padded is None:
            return call
        self.rewritten += 1
        return padded

    def _token_rows(self, call: relax.Call):
        """A linear over a dynamic batch of T token rows, T not a multiple of ROW_PAD, computes T' padded rows.

        ``matmul(reshape(x, (n * T, K)), W)`` (a decomposed linear; or ``matmul(x, W)``), x ``(n, T, K)`` with
        a symbolic batch n and W ``(K, N)`` -> ``reshape(strided_slice(matmul(pad(x, T'), W), T), (n * T, N))``.
        The matmul rule sees the rows as one symbolic extent n * T, which it cannot pad: only tiles dividing T
        are whole, and with T prime (197 tokens, 47 after merging) every row tile was partial, with a predicate
        in each update; a dynamic-batch ViT ran 2x slower than its static build.  The pad and the slice copy
        activations (T'·K and T·N values) against T'·K·N multiply-adds.
        """
        rows, weight = call.args
        w_shape = shape_values(weight)
        if w_shape is None or len(w_shape) != 2 or not all(isinstance(v, tirx.IntImm) for v in w_shape):
            return None
        depth, columns = w_shape
        found = token_rows_to_pad(self, rows, int(columns), self.lanes)
        if found is None:
            return None
        x, tokens, padded, flat = found
        batch, _, *features = shape_values(x)
        bb = self.builder_
        if len(features) > 1:  # (n, T, heads, head dim) after attention, its reshapes merged into one
            if not all(isinstance(f, tirx.IntImm) for f in features) \
                    or math.prod(int(f) for f in features) != int(depth):
                return None
            x = bb.emit(relax.op.reshape(x, (batch, tokens, depth)))
        return product_of_padded_rows(bb, x, tokens, padded, flat,
                                      lambda rows: bb.emit(relax.Call(call.op, [rows, weight], call.attrs)), int(columns))

    def _flattened(self, expr):
        """(source, shape) when `expr` is a variable bound to ``reshape(source, shape)``, else None."""
        bound = bound_call(self, expr, "relax.reshape")
        return None if bound is None else (bound.args[0], shape_values(expr))

    def _bias_before_flatten(self, call: relax.Call) -> relax.Expr:
        """``add(bias, reshape(y, (n * T, N)))`` over a symbolic row count -> ``reshape(add(bias, y), (n * T, N))``.

        A linear decomposes to ``reshape(x, (n * T, K))``, matmul, bias add, ``reshape`` back.  With the
        matmul on ``(n, T', K)`` padded rows (:meth:`_token_rows`), the bias add sat between two reshapes,
        a kernel of its own instead of the matmul's epilogue.  Adding a bias along the last dim commutes
        with a reshape that keeps that dim; :meth:`_merge_reshapes` then drops the reshape pair.
        """
        for index in (0, 1):
            bias, flat = call.args[index], call.args[1 - index]
            bias_shape, found = shape_values(bias), self._flattened(flat)
            if bias_shape is None or len(bias_shape) != 1 or found is None:
                continue
            source, shape = found
            source_shape = shape_values(source)
            if (shape is None or len(shape) != 2 or isinstance(shape[0], tirx.IntImm) or source_shape is None
                    or len(source_shape) < 3
                    or not _same_dims([source_shape[-1], shape[1]], [shape[1], bias_shape[0]])):
                continue
            slicing = bound_call(self, source, "relax.strided_slice")
            if slicing is not None and len(source_shape) - 1 in _slice_axes(slicing, len(source_shape)):
                slicing = None
            inner = source if slicing is None else slicing.args[0]  # the bias goes before a slice of rows
            operands = [bias, inner] if index == 0 else [inner, bias]
            added = self.builder_.emit(relax.Call(call.op, operands, call.attrs))
            if slicing is not None:
                added = self.builder_.emit(relax.Call(slicing.op, [added, *slicing.args[1:]], slicing.attrs))
            self.rewritten += 1
            return relax.op.reshape(added, list(shape))
        return call

    def _merge_reshapes(self, call: relax.Call) -> relax.Expr:
        """``reshape(reshape(z, s1), s2)`` over symbolic dims -> ``reshape(z, s2)``, or z when s2 is z's shape."""
        found = self._flattened(call.args[0])
        shape = shape_values(call)
        if found is None or shape is None or all(isinstance(dim, tirx.IntImm) for dim in shape):
            return call
        source = found[0]
        source_shape = shape_values(source)
        self.rewritten += 1
        if source_shape is not None and _same_dims(source_shape, shape):
            return source
        return relax.op.reshape(source, list(shape))

    def _sliced_from(self, expr):
        """(padded source, steps) when `expr` is a slice of the last two axes (from 0, step 1) followed by `steps`
        that leave those axes alone: reshapes of the leading dims, a same-shape ``broadcast_to``, a multiply
        or divide by a scalar (the attention scale), an add of a row of column biases (ToMe's log(size),
        :func:`_column_bias`).  None otherwise."""
        steps = []
        while True:
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
            name = getattr(bound.op, "name", "") if isinstance(bound, relax.Call) else ""
            bias_index = _column_bias(bound) if name == "relax.add" else None
            if bias_index is not None:
                steps.append(bound)
                expr = bound.args[1 - bias_index]
                continue
            out_dims, in_dims = _static_dims(expr), _static_dims(bound.args[0]) if name else None
            if name == "relax.strided_slice":
                rank = len(out_dims or ())
                begins, strides = bound.args[2], bound.args[4] if len(bound.args) > 4 else None
                if (not rank or _slice_axes(bound, rank) - {rank - 2, rank - 1}
                        or any(int(getattr(b, "value", b)) != 0 for b in begins)
                        or (strides is not None and any(int(getattr(t, "value", t)) != 1 for t in strides))):
                    return None
                return bound.args[0], steps[::-1]
            if out_dims is None or in_dims is None or out_dims[-2:] != in_dims[-2:]:
                return None
            if name == "relax.reshape" or (name == "relax.broadcast_to" and _same_dims(out_dims, in_dims)):
                steps.append(bound)
            elif name in ("relax.multiply", "relax.divide") and _is_scalar_constant(bound.args[1]) \
                    and _same_dims(out_dims, in_dims):
                steps.append(bound)
            else:
                return None
            expr = bound.args[0]

    def _replay(self, full, steps: list) -> relax.Expr:
        """`steps` (from :meth:`_sliced_from`) applied to `full`, whose last two axes are the padded ones."""
        rows, cols = _static_dims(full)[-2:]
        for step in steps:
            name = step.op.name
            if name == "relax.reshape":
                lead = list(shape_values(step))[:-2]
                full = self.builder_.emit(relax.op.reshape(full, [*lead, rows, cols]))
            elif name in ("relax.multiply", "relax.divide"):
                full = self.builder_.emit(relax.Call(step.op, [full, step.args[1]], step.attrs))
            elif name == "relax.add":  # the bias' padded columns are 0; the softmax masks them anyway
                index = _column_bias(step)
                bias = step.args[index]
                rank, width = len(shape_values(bias)), _static_dims(bias)[-1]
                bias = self.builder_.emit(relax.op.nn.pad(bias, [0] * (2 * rank - 1) + [cols - width]))
                operands = [full, bias] if index == 1 else [bias, full]
                full = self.builder_.emit(relax.Call(step.op, operands, step.attrs))
        return full

    def _softmax_over_padded_columns(self, call: relax.Call) -> relax.Expr:
        """``softmax(slice(scores))`` over a prime column count (197 tokens) whose scores were computed padded
        (:meth:`_tiles`) -> ``slice(softmax(where(column < n, scores, -inf)))``, through the reshapes and the
        scale between them.

        A row no divisor splits kept one scalar chain per reduction (:mod:`.reduction_schedule`): a
        ViT's 197-wide softmax at batch 64 ran 13.6 ms where eager takes 6.5.  Over the padded columns,
        masked to -inf (exp gives 0 there), the row splits into vectors; the mask fuses with the scale,
        and :meth:`_probabilities_times_values` reads the padded probabilities.
        """
        x = call.args[0]
        shape = _static_dims(x)
        if shape is None or int(call.attrs.axis) % len(shape) != len(shape) - 1:
            return call
        columns = shape[-1]
        if columns <= self.lanes or _splits_in_vectors(columns, self.lanes):
            return call
        found = self._sliced_from(x)
        if found is None:
            return call
        scores, steps = found
        full = _static_dims(scores)
        if full is None or full[-1] <= columns or accumulator_count(full[-1]) is None:
            return call
        bb = self.builder_
        scaled = self._replay(scores, steps)
        mask = relax.const(np.arange(full[-1]) < columns)
        masked = bb.emit(relax.op.where(mask, scaled, relax.const(float("-inf"), str(x.ty.dtype))))
        probabilities = bb.emit(relax.Call(call.op, [masked], call.attrs))
        self.padded_probabilities[probabilities] = columns
        self.rewritten += 1
        rank = len(shape)
        return relax.op.strided_slice(probabilities, [rank - 2, rank - 1], [0, 0], shape[-2:], assume_inbound=True)

    def _probabilities_times_values(self, call: relax.Call):
        """``p @ v`` where p is a slice of :meth:`_softmax_over_padded_columns`' padded probabilities (through
        reshapes): their padded columns are 0, so ``p_padded @ pad(v)`` (v's rows padded with zeros) gives the
        same product without copying p into a slice and a pad of its own."""
        probabilities, values = call.args
        shape, v_shape = _static_dims(probabilities), _static_dims(values)
        if shape is None or v_shape is None or len(v_shape) != len(shape):
            return None
        found = self._sliced_from(probabilities)
        if found is None or found[0] not in self.padded_probabilities:
            return None
        rows, depth, cols = shape[-2], shape[-1], v_shape[-1]
        if v_shape[-2] != depth or self.padded_probabilities[found[0]] != depth:
            return None
        padded_rows, padded_depth = _static_dims(found[0])[-2:]  # the steps leave the last two axes alone
        row_tile, col_tile = register_tile(rows, cols, self.lanes)
        if padded_rows % row_tile:
            return None
        full = self._replay(*found)
        rank = len(shape)
        padded_cols = round_up(cols, col_tile)
        bb = self.builder_
        pads = [0] * (2 * rank - 4) + [0, padded_depth - depth, 0, padded_cols - cols]
        values = bb.emit(relax.op.nn.pad(values, pads))
        product = bb.emit(relax.Call(call.op, [full, values], call.attrs))
        self.rewritten += 1
        return relax.op.strided_slice(product, [rank - 2, rank - 1], [0, 0], [rows, cols], assume_inbound=True)

    def _tiles(self, call: relax.Call):
        """A batched matmul of two activations (attention scores ``q @ k^T``, ``p @ v``) whose static rows or
        columns no register tile divides computes whole tiles of padded operands.

        ``matmul(a (.., M, K), b (.., K, N))`` -> ``strided_slice(matmul(pad(a, M'), pad(b, N')), M, N)``
        with M', N' the multiples of the tile :func:`register_tile` picks.  Inside the matmul function the
        rule would pad with copies of both operands and copy each tile's valid part out with a scalar
        predicated loop, which costs as much as the 64-deep FMA loop of an attention score tile; here
        the pads fuse into the operands' producers (a transpose, the softmax) and the slice into the
        consumer, so the matmul writes whole vector tiles.
        """
        a, b = call.args
        a_shape, b_shape = shape_values(a), shape_values(b)
        if a_shape is None or b_shape is None or len(a_shape) < 3 or len(a_shape) != len(b_shape):
            return None
        rows, cols = a_shape[-2], b_shape[-1]
        if not isinstance(rows, tirx.IntImm) or not isinstance(cols, tirx.IntImm):
            return None
        rows, cols = int(rows), int(cols)
        row_tile, col_tile = register_tile(rows, cols, self.lanes)
        padded_rows, padded_cols = round_up(rows, row_tile), round_up(cols, col_tile)
        if (padded_rows, padded_cols) == (rows, cols):
            return None
        again = register_tile(padded_rows, padded_cols, self.lanes)
        if padded_rows % again[0] or padded_cols % again[1]:  # the rule would pad once more
            return None
        bb = self.builder_
        rank = len(a_shape)
        if padded_rows != rows:
            a = bb.emit(relax.op.nn.pad(a, [0] * (2 * rank - 3) + [padded_rows - rows, 0, 0]))
        if padded_cols != cols:
            b = bb.emit(relax.op.nn.pad(b, [0] * (2 * rank - 1) + [padded_cols - cols]))
        product = bb.emit(relax.Call(call.op, [a, b], call.attrs))
        return relax.op.strided_slice(product, [rank - 2, rank - 1], [0, 0], [rows, cols], assume_inbound=True)


@tvm.transform.module_pass(opt_level=0, name="fxpress.PadMatmuls")
class PadMatmuls:
    """Matmuls with ragged tiles compute padded ones (see :class:`_PadMatmulMutator`); runs before fusion."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator = _PadMatmulMutator(mod, self.lanes)
        mod = rewrite_relax_functions(mod, mutator, lambda: mutator.rewritten)
        log.debug("%d matmul pads and bias moves", mutator.rewritten)
        # the rewritten bindings (flat views, slices a bias moved past) are left unused
        return relax.transform.DeadCodeElimination()(mod) if mutator.rewritten else mod


def cpu_rules(gemv: bool = True) -> list[ScheduleRule]:
    """The rules ApplyDefaultSchedule tries on llvm targets, most specific first.

    gemv: the single-row matmul rule (:mod:`.gemv_schedule`); False leaves those functions to the
    others (which do not take them: naive loops), for comparisons.
    """
    from tvm.s_tir import dlight as dl

    from fxpress.backends.tvm.conv_schedule import DirectConv
    from fxpress.backends.tvm.gemv_schedule import GEMV
    from fxpress.backends.tvm.reduction_schedule import RowReduction

    return [*([GEMV()] if gemv else []), DirectConv(), Matmul(), dl.cpu.GEMV(), RowReduction(), Injective()]


__all__ = ["Injective", "Matmul", "PadMatmuls", "cpu_rules", "llvm_get_vector_width"]
