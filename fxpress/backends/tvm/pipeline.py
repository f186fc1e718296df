"""Relax pipelines per target: the default lowering plus fxpress's CPU schedules.

TVM's default CPU pipeline legalizes and fuses but leaves every TIR
function unscheduled (naive loops).  On llvm ours legalizes softmax, GELU,
SiLU, exp, erf, tanh with vectorizable polynomials (:mod:`.fast_math`;
libm's expf/erff run one lane at a time), then adds, after fusion:

1. ``MetaScheduleApplyDatabase`` when a tuning database is given (tuned
   functions are marked scheduled and left alone), then
2. ``ApplyDefaultSchedule`` with the rules of :mod:`.schedules` (single-row
   matmuls, matmul, conv2d, reductions, elementwise) and dlight's CPU
   GEMV/Reduction.

Before lifting, single-row linears (batch-1 decode), linears of a few static rows and large
weights take their weight packed in column panels (:mod:`.gemv_schedule`), and linears over a dynamic batch of
token rows pad the rows to whole tiles (:class:`.schedules.PadMatmuls`, which also moves their
bias adds next to the matmul), and so do the ragged rows and columns of attention matmuls.
Reshapes to symbolic dims legalize as injective gathers (:func:`_reshape_affine`), so they fuse.

``LiftTransformParams`` runs first so weight-only work (transposes of
linear weights, layout changes) moves to ``main_transform_params`` and runs
once at load time instead of on every call.

With a dump folder the pipeline writes the module as TVMScript after fusion
(``01_fused.tir.py``, TIR still naive) and after scheduling
(``02_scheduled.tir.py``, what the build turns into code); the driver writes
the Relax module it lowered first (``00_lowered.relax.py``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import tvm
from tvm import relax

from fxpress.backends.tvm.schedule_utils import shape_values

log = logging.getLogger(__name__)

NHWC_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def _take_wrapping_indices(bb, call):
    """``take`` with torch's index semantics (negative indices count from the end).

    TVM legalizes the importer's ``mode="fast"`` with a warning on every compile ("Fast mode
    segfaults when there are out-of-bounds indices"); "wrap" costs one modulo per index and
    cannot read out of bounds.
    """
    from tvm import topi

    return bb.call_te(topi.take, call.args[0], call.args[1], call.attrs.axis, mode="wrap")


def _reshape_affine(bb, call):
    """``reshape`` with symbolic dims as a TIR gather whose indices are affine in the loop variables.

    TVM's legalization unravels the flat index with a modulo on every dim, the first included
    (``x[(i * 54 + j) % (n * 54), k]``); with a symbolic extent the modulo stays,
    ``AnnotateTIROpPattern`` calls the function opaque, and ``FuseOps`` fuses nothing across it: a
    dynamic-batch ViT's linears (``reshape(x, (n * T, K))``, matmul, bias, ``reshape`` back) ran as
    separate kernels for the matmul, the slice of padded rows, the bias and each activation.  Here
    the first dim takes the quotient alone (the flat index is in bounds), so the gather is injective.
    Reshapes to a product of dims (attention's ``(n, H, T, D) -> (n * H, T, D)``) fuse too: left opaque,
    each was a VM reshape between two kernels, and the pad after it a kernel of its own.  Rules that
    name such a product with a match_cast reshape with TVM's gather (:func:`.rules.rows_as_one_var`).
    """
    from tvm import te
    from tvm.sym.analyzer import Analyzer

    data, target = call.args
    if isinstance(target, relax.Var):
        target = bb.lookup_binding(target)
    in_shape, out_shape = shape_values(data), shape_values(call)
    static = in_shape is not None and out_shape is not None and \
        all(isinstance(dim, tvm.tirx.IntImm) for dim in [*in_shape, *out_shape])
    if static or out_shape is None or not isinstance(target, relax.ShapeExpr):
        return tvm.ir.Op.get("relax.reshape").get_attr("FLegalize")(bb, call)

    def gather(tensor, out_shape):  # out_shape as a call_te argument makes its symbolic dims parameters
        source_dims = list(tensor.shape)

        def index(*out_index):
            analyzer = Analyzer()
            for var, extent in zip(out_index, out_shape):
                analyzer.bind(var, tvm.ir.Range.from_min_extent(0, extent))
            flat = 0
            for var, extent in zip(out_index, out_shape):
                flat = flat * extent + var
            source = []
            for extent in reversed(source_dims[1:]):
                source.append(analyzer.simplify(tvm.tirx.floormod(flat, extent)))
                flat = tvm.tirx.floordiv(flat, extent)
            source.append(analyzer.simplify(flat))
            return tensor[tuple(reversed(source))]

        return te.compute(out_shape, index, name="T_reshape")

    return bb.call_te(gather, data, target, primfunc_name_hint="reshape")


def _constant_only_call(mod: tvm.IRModule) -> bool:
    """Whether a Relax function of `mod` calls anything on constants alone (what FoldConstant folds)."""
    found = []

    def leaves(args):
        for arg in args:
            if isinstance(arg, relax.Tuple):
                yield from leaves(arg.fields)
            elif isinstance(arg, relax.Expr) and not isinstance(arg, (relax.GlobalVar, relax.ShapeExpr)):
                yield arg

    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr) -> None:
        if isinstance(expr, relax.Call):
            args = list(leaves(expr.args))
            generator = not args and isinstance(expr.op, tvm.ir.Op) and expr.op.same_as(call_tir)  # arange, full
            if generator or (args and all(type(arg).__name__ == "Constant" for arg in args)):
                found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="FoldConstantWhereAny")
def _fold_constants(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """FoldConstant, only where some call reads constants alone: with nothing to fold it still took
    7.5 s of gdnet-lite's 11 s build (and 1.6 s of MiniLM's), a first compile over 10 s."""
    return relax.transform.FoldConstant()(mod) if _constant_only_call(mod) else mod


def _legalize_and_fuse(fast_math: bool) -> list:
    from fxpress.backends.tvm.fast_math import legalize_map

    rules = {"relax.take": _take_wrapping_indices, "relax.reshape": _reshape_affine,
             **(legalize_map() if fast_math else {})}
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(rules),
        relax.transform.AnnotateTIROpPattern(),
        _fold_constants,
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def _lower_and_finalize(cuda: bool = False) -> list:
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        *([relax.transform.RewriteCUDAGraph()] if cuda else []),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        reuse_shape_values,
        relax.transform.AttachGlobalSymbol(),
        single_pointer_functions_noalias,
    ]


SHAPE_BUILTINS = ("vm.builtin.make_shape", "vm.builtin.make_prim_value")


@tvm.transform.module_pass(opt_level=0, name="fxpress.ReuseShapeValues")
def reuse_shape_values(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """One VM call per distinct symbolic shape (and prim value) of a function, not one per use.

    ``VMShapeLower`` builds every symbolic shape from the shape heap where it is used: a ViT over a
    dynamic batch made 456 ``make_shape`` calls per run for 235 distinct shapes, and 93
    ``make_prim_value`` calls for one value.  Each is an interpreted VM call of about a
    microsecond, most of what a dynamic build lost to its static build at batch 1.  A heap slot is
    written once, before any read, so a later call with the same arguments in the function's
    top-level bindings returns the same value: its uses read the first call's variable.  Only
    those variables change: this runs after ``KillAfterLastUse``, so no other binding may move
    (``CanonicalizeBindings`` here read a tensor after its kill: a crash).
    """
    changed = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            top = {binding.var for block in func.body.blocks for binding in block.bindings}
            reuse = _ShapeValueReuse(mod, top)
            rewritten = reuse.visit_expr(func)
            if reuse.reused:
                changed[gvar] = rewritten
    return _with_functions(mod, changed)


@relax.expr_functor.mutator
class _ShapeValueReuse(relax.PyExprMutator):
    """:func:`reuse_shape_values` on one function; `top`: the variables of its top-level bindings."""

    def __init__(self, mod: tvm.IRModule, top: set):
        super().__init__(mod)
        self.top = top
        self.first: dict[tuple, relax.Var] = {}
        self.reused = 0

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        key = _shape_call_key(binding.value) if binding.var in self.top else None
        if key in self.first:
            self.set_var_remap(binding.var, self.first[key])
            self.reused += 1
            return
        super().visit_var_binding_(binding)
        if key is not None:
            self.first[key] = binding.var  # its value reads the heap and constants alone: not rewritten


def _shape_call_key(value: relax.Expr) -> tuple | None:
    """(builtin, heap, integer arguments) of a ``make_shape``/``make_prim_value`` call, else None."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, relax.ExternFunc) \
            or value.op.global_symbol not in SHAPE_BUILTINS or not value.args \
            or not isinstance(value.args[0], relax.Var):
        return None
    if not all(isinstance(arg, tvm.tirx.IntImm) for arg in value.args[1:]):
        return None
    return (value.op.global_symbol, value.args[0], *(int(arg.value) for arg in value.args[1:]))


def _with_functions(mod: tvm.IRModule, changed: dict) -> tvm.IRModule:
    """`mod` with the functions of `changed` ({GlobalVar: function}) replaced (`mod` itself when none)."""
    if not changed:
        return mod
    mod = mod.clone()
    for gvar, func in changed.items():
        mod[gvar] = func
    return mod


@tvm.transform.module_pass(opt_level=0, name="fxpress.SinglePointerFunctionsNoAlias")
def single_pointer_functions_noalias(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark PrimFuncs with at most one pointer parameter (the VM's ``shape_func``) ``tirx.noalias``.

    TVM 0.27's LLVM code generator reads a function's ``tirx.noalias`` while it declares all the
    module's functions, then emits every function with the value of the last one declared (in name
    order).  A dynamic build's ``shape_func`` has no such attribute, so when its name sorted last
    every kernel of the module lost its ``noalias`` parameters and per-buffer alias information:
    LLVM then kept register tiles in memory, storing the accumulators at every step of the
    reduction (2x slower; a width-384 linear over a dynamic batch with weight panels: 1.41 ms
    against 0.66).  One pointer cannot alias another, so the attribute is true of such functions;
    functions with more pointers are left as they are (:func:`mixed_alias_functions` names them).
    """
    single = [gvar for gvar, func in mod.functions_items()
              if isinstance(func, tvm.tirx.PrimFunc) and not _noalias(func) and _pointer_params(func) <= 1]
    mod = _with_functions(mod, {gvar: mod[gvar].with_attr("tirx.noalias", True) for gvar in single})
    mixed = mixed_alias_functions(mod)
    if mixed:
        log.warning("functions without tirx.noalias among ones with it (%s): TVM 0.27 emits the whole "
                    "module with the alias setting of the one declared last", ", ".join(mixed[:5]))
    return mod


def mixed_alias_functions(mod: tvm.IRModule) -> list[str]:
    """Names of `mod`'s PrimFuncs without ``tirx.noalias`` when others have it: TVM 0.27 would
    emit all of them with the alias setting of the function declared last
    (:func:`single_pointer_functions_noalias`)."""
    funcs = {gvar.name_hint: func for gvar, func in mod.functions_items() if isinstance(func, tvm.tirx.PrimFunc)}
    without = sorted(name for name, func in funcs.items() if not _noalias(func))
    return without if len(without) < len(funcs) else []


def _noalias(func) -> bool:
    return bool(func.attrs and func.attrs.get("tirx.noalias", False))


def _pointer_params(func) -> int:
    return sum(1 for param in func.params if isinstance(param.ty, (tvm.tirx.BufferType, tvm.ir.PointerType)))


STACK_BYTES = 16 << 10  # the largest buffer of constant size a CPU kernel keeps on its stack
_HEAP_FROM = 1024  # TVM's kMaxStackAlloca: from this many bytes LowerTVMBuiltin allocates from the workspace pool


def _constant_bytes(buffer) -> int | None:
    size = 1
    for dim in buffer.shape:
        if not isinstance(dim, tvm.tirx.IntImm):
            return None
        size *= int(dim.value)
    return size * buffer.dtype.bits * buffer.dtype.lanes // 8


def _on_stack(alloc):
    """`alloc` annotated to stay on the stack when it is a global buffer of constant size from 1 KB to
    :data:`STACK_BYTES`, else None (left alone)."""
    nbytes = _constant_bytes(alloc.buffer)
    if (nbytes is None or not _HEAP_FROM <= nbytes <= STACK_BYTES or alloc.buffer.scope() != "global"
            or "disable_lower_builtin" in alloc.annotations):
        return None
    return tvm.tirx.AllocBuffer(alloc.buffer, {**alloc.annotations, "disable_lower_builtin": tvm.tirx.IntImm("int32", 1)})


@tvm.transform.module_pass(opt_level=0, name="fxpress.StackTiles")
def stack_tiles(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """CPU kernels keep their per-tile buffers of 1-16 KB on the stack, not in TVM's workspace pool.

    ``LowerTVMBuiltin`` puts a buffer of constant size on the stack only under 1024 bytes; from there on
    every allocation is a ``TVMBackendAllocWorkspace`` / ``FreeWorkspace`` pair, which walks and reorders
    the pool's lists.  A register tile of 16 AVX-512 accumulators (4 rows x 64 columns of fp32) is
    exactly 1024 bytes and is allocated once per tile: a merged ViT's dynamic-batch build made 17,890
    such calls per batch-1 run (its static build 3,104), 11% of its time under ``perf``.  LLVM allocates
    the annotated buffers at function entry (``alloca``), once per call of the kernel or parallel task.
    Runs before ``LowerTVMBuiltin`` (the host finalization of :func:`fxpress_tir_pipeline`).
    """
    import tvm_ffi

    changed = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        target = func.attrs.get("target") if func.attrs else None
        if target is None or target.kind.name != "llvm":  # C sources may go to small stacks
            continue
        body = tvm_ffi.structural_map(func.body, [(tvm.tirx.AllocBuffer, lambda alloc: _on_stack(alloc) or alloc)],
                                      order="post")
        if not body.same_as(func.body):  # copy on write: an unchanged body is the same object
            changed[gvar] = func.with_body(body)
    return _with_functions(mod, changed)


def fxpress_tir_pipeline():
    """TVM's default TIR pipeline for CPUs (``s_tir``) with :func:`stack_tiles` before its host finalization;
    registered as the TIR pipeline ``"fxpress"`` (what :func:`.build.compile_relax` builds with)."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    pipeline, default_finalize_host, finalize_device = default_s_tir_pipeline()

    def finalize_host():
        return tvm.transform.Sequential([stack_tiles, default_finalize_host()])

    return pipeline, finalize_host, finalize_device


tvm.tirx.register_tir_pipeline("fxpress", fxpress_tir_pipeline)


def schedule_passes(target: tvm.target.Target, database_dir: str | None = None,
                    schedule: bool = True, gemv: bool = True) -> list:
    """The scheduling passes that run after fusion for `target` (gemv: see :func:`build_pipeline`)."""
    from tvm.s_tir import dlight as dl

    passes = []
    if database_dir is not None:
        passes.append(relax.transform.MetaScheduleApplyDatabase(database_dir))
    if target.kind.name == "cuda":
        passes.append(dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                              dl.gpu.GeneralReduction(), dl.gpu.Fallback()))
    elif target.kind.name == "llvm" and schedule:
        from fxpress.backends.tvm.schedules import cpu_rules

        passes.append(dl.ApplyDefaultSchedule(*cpu_rules(gemv=gemv)))
    return passes


def _calls(mod: tvm.IRModule, op_name: str) -> bool:
    """Whether a Relax function of `mod` calls the operator `op_name`.

    ``ConvertLayout`` runs only where there is a convolution: on graphs without one it still
    rewrote the module, and a compiled decode step with a packed KV cache (symbolic lengths)
    then crashed at run time.
    """
    op = tvm.ir.Op.get(op_name)
    found = []

    def visit(expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.same_as(op):
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


def fused_module(mod: tvm.IRModule, target: tvm.target.Target, fast_math: bool | None = None,
                 gemv: bool | None = None, direct_conv: bool | None = None) -> tvm.IRModule:
    """`mod` after param lifting, legalization and fusion: the functions schedules and tuning see.

    fast_math (default: on for llvm): exp/erf/tanh as vectorizable polynomials (:mod:`.fast_math`).
    gemv (default: on for llvm): single-row and few-row linears take their weight packed in column panels
    (:class:`.gemv_schedule.PackGemvWeights`, done once at load time by ``main_transform_params``).
    direct_conv (default: with fast_math on llvm): conv2d in NHWC activations and HWIO weights
    (``ConvertLayout``), for the direct convolution rule of :mod:`.conv_schedule`.
    """
    from fxpress.backends.tvm.gemv_schedule import PackGemvWeights
    from fxpress.backends.tvm.schedules import PadMatmuls

    if fast_math is None:
        fast_math = target.kind.name == "llvm"
    if gemv is None:
        gemv = target.kind.name == "llvm"
    packing = [PackGemvWeights(target)] if gemv else []
    if fast_math and target.kind.name == "llvm":  # llvm with fxpress's schedules: whole row tiles for a
        # dynamic batch of token rows and for attention matmuls (schedules.PadMatmuls)
        from fxpress.backends.tvm.schedule_utils import vector_bits

        packing.append(PadMatmuls(vector_bits(target) // 32))
    if direct_conv is None:
        direct_conv = target.kind.name == "llvm" and fast_math
    if direct_conv and _calls(mod, "relax.nn.conv2d"):  # NHWC activations, HWIO weights (at load): conv_schedule
        from fxpress.backends.tvm.conv_schedule import PadConvChannels, PadInProducer

        packing = [relax.transform.ConvertLayout(NHWC_LAYOUTS), PadConvChannels(target), PadInProducer(), *packing]
    seq = tvm.transform.Sequential([*packing, relax.transform.LiftTransformParams(),
                                    *_legalize_and_fuse(fast_math)])
    with target:
        return seq(mod)


def with_upper_bounds(mod: tvm.IRModule, upper_bounds: dict[str, int]) -> tvm.IRModule:
    """`mod` with ``tir_var_upper_bound`` on each Relax function that defines one of those variables:
    ``StaticPlanBlockMemory`` reads it to plan symbolic-size tensors into shared storages of the bounded
    size, where without it every such tensor is a storage of its own."""
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        defined = {var.name for var in relax.analysis.defined_symbolic_vars(func)}
        found = {name: bound for name, bound in upper_bounds.items() if name in defined}
        if found:
            mod[gvar] = func.with_attr("tir_var_upper_bound", found)
    return mod


def write_ir(mod: tvm.IRModule, folder: str | Path, name: str) -> Path:
    """Write `mod` as TVMScript text (``mod.script()``) to `folder/name`; returns the path."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(mod.script() + "\n")
    log.info("wrote %s", path)
    return path


def build_pipeline(target: tvm.target.Target, *, database_dir: str | None = None,
                   schedule: bool = True, dump_dir: str | Path | None = None,
                   gemv: bool = True, upper_bounds: dict[str, int] | None = None) -> tvm.transform.Pass:
    """The whole Relax pipeline for `target` (pass it to ``tvm.compile(relax_pipeline=...)``).

    dump_dir: write the module after fusion and after scheduling there (see the module docstring).
    gemv: single-row linears with packed weights and their schedule (:mod:`.gemv_schedule`; llvm
    with schedules only); False leaves them to the other rules, for comparisons.
    upper_bounds: {TIR variable name: its largest value}; memory planning then shares storages between
    a dynamic build's intermediates, sized for those values (:func:`with_upper_bounds`).
    """

    @tvm.transform.module_pass(opt_level=0, name="fxpress_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            llvm = schedule and target.kind.name == "llvm"
            mod = fused_module(mod, target, fast_math=llvm, gemv=llvm and gemv)
            if dump_dir is not None:
                write_ir(mod, dump_dir, "01_fused.tir.py")
            mod = tvm.transform.Sequential(schedule_passes(target, database_dir, schedule, gemv))(mod)
            if dump_dir is not None:
                write_ir(mod, dump_dir, "02_scheduled.tir.py")
            if upper_bounds:
                mod = with_upper_bounds(mod, upper_bounds)
            return tvm.transform.Sequential(_lower_and_finalize(cuda=target.kind.name == "cuda"))(mod)

    return _pipeline
