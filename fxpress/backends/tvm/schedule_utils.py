"""Small helpers shared by the CPU schedule rules."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features, llvm_get_vector_width


def is_cpu(target: Target) -> bool:
    return target.kind.name == "llvm"


def root_block(sch: s_tir.Schedule):
    return sch.get_sblock("root") if hasattr(sch, "get_sblock") else sch.get_block("root")


def has_root_block(func: tirx.PrimFunc) -> bool:
    """False for opaque functions without a ``root`` block (e.g. TOPI's generic cumsum)."""
    try:
        root_block(s_tir.Schedule(func))
    except Exception:  # noqa: BLE001 - ScheduleError: no block named root
        return False
    return True


def extent(sch: s_tir.Schedule, loop) -> int | object:
    """A loop's extent as an int when static, else the symbolic expression."""
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else value


def round_up(size: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `size` (a padded extent)."""
    return -(-size // multiple) * multiple


def shape_values(expr) -> list | None:
    """The dims of a Relax tensor expression (IntImm or symbolic), None when its shape is unknown."""
    return getattr(getattr(getattr(expr, "ty", None), "shape", None), "values", None)


def pick_factor(size, candidates: list[int]) -> int | None:
    """The first candidate (> 0) that divides a static `size`; for symbolic sizes the first one."""
    usable = [c for c in candidates if c and c > 0]
    if not isinstance(size, int):
        return usable[0] if usable else None
    for candidate in usable:
        if candidate <= size and size % candidate == 0:
            return candidate
    return None


def vector_bits(target: Target) -> int:
    """The SIMD register width in bits the schedules size their tiles for.

    LLVM's answer alone is wrong on some x86 hosts: it reports 512 bits for an AVX2-only
    znver3 (AMD EPYC), where a "16-lane" vector is two 256-bit registers and a register
    tile sized for 32 AVX-512 registers spills.  On x86 without AVX-512F the width is
    therefore capped at 256 bits (AVX) or 128 (SSE).
    """
    bits = llvm_get_vector_width(target)
    bits = bits if bits and bits > 0 else 128
    if _is_x86(target) and bits > 256 and not llvm_cpu_has_features(["avx512f"], target):
        bits = 256 if llvm_cpu_has_features(["avx"], target) else 128
    return bits


def _is_x86(target: Target) -> bool:
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    return not triple or triple.startswith(("x86", "i686"))


def vector_lanes(target: Target, stmt) -> int:
    """SIMD lanes for the block's output dtype (AVX-512 f32: 16; AVX2: 8; NEON f32: 4)."""
    bits = vector_bits(target)
    dtype_bits = stmt.writes[0].source.dtype.bits if stmt.writes else 32
    return max(bits // max(dtype_bits, 8), 1)


def multiply_add_reads(stmt) -> bool:
    """A block with exactly two buffer reads besides its output: C += A * B."""
    reads = [r for r in stmt.reads if not any(r.source.same_as(w.source) for w in stmt.writes)]
    return len(reads) == 2 and len(stmt.reads) in (2, 3)


def vector_factor(size, lanes: int) -> int | None:
    """The largest divisor of a static `size` in [2, 2*lanes], so a vectorized loop needs no tail
    predicate (a predicated vector loop is scalarized); None when there is none."""
    if not isinstance(size, int):
        return None
    for factor in range(min(size, 2 * lanes), 1, -1):
        if size % factor == 0:
            return factor
    return None


def cpu_main_reduction(func, target: Target, only: bool = False):
    """(schedule, first reduction block) of a TIR function a CPU rule may take, else None.

    None for anything but a PrimFunc with a root block on an llvm target, for functions without a
    reduction and, with `only`, for functions with more than one.
    """
    from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks

    if not isinstance(func, tirx.PrimFunc) or not is_cpu(target) or not has_root_block(func):
        return None
    sch = s_tir.Schedule(func)  # checks stay on: unchecked reverse_compute_at misplaced epilogues
    reductions = get_reduction_blocks(sch, sch.get_child_blocks(root_block(sch)))
    if reductions is None or (only and len(reductions) != 1):
        return None
    return sch, reductions[0]


def bound_call(mutator, expr, op_name: str):
    """The call `expr` (a variable the Relax `mutator` has bound) is bound to when it calls `op_name`, else None."""
    from tvm import relax

    bound = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None
    if isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == op_name:
        return bound
    return None


def rewrite_relax_functions(mod, mutator, count, prepare=None):
    """Run a Relax `mutator` over the Relax functions of `mod`; return the module with the functions where
    `count()` (the mutator's rewrite counter) grew replaced.  `prepare(func)`, when given, readies the
    mutator for one function and returns False to leave it alone."""
    from tvm import relax

    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or (prepare is not None and not prepare(func)):
            continue
        before = count()
        new_func = mutator.visit_expr(func)
        if count() != before:
            mutator.builder_.update_func(gv, new_func)
    return mutator.builder_.get()
