"""MetaSchedule tuning for llvm, in-process, with a persistent JSON database.

Why in-process: MetaSchedule's LocalBuilder starts a pool of fresh Python
workers for every batch (on purpose: long-lived workers leak), and its
``default_build`` does ``import tvm.s_tir.tensor_intrin`` in each worker.
That import registers every tensor intrinsic and took 38 s here (``import
tvm`` alone: 4 s), inside the per-candidate 30 s timeout: every candidate
timed out.  :class:`InProcessBuilder` builds in this process without that
import (float32 llvm schedules use no tensor intrinsics) in well under a
second per candidate; :class:`InProcessRunner` times it with
``time_evaluator``, also without a worker.  ``TuneContext`` itself imports
``tensor_intrin`` too; on x86 only its ``x86`` module is loaded (0.7 s, see
:func:`_x86_tensor_intrinsics_only`).  Without xgboost the search
is "replay-trace" (random samples of the design space, each measured).

The database (``database_workload.json``, ``database_tuning_record.json`` in
``tuning_dir``) is what ``MetaScheduleApplyDatabase`` reads.  Before tuning,
every task gets fxpress's default schedule measured and recorded, so the
database's best is never slower than the default, and a task that has any
record is not tuned again: the next compile with the same folder and the
same functions runs zero trials.

With a :class:`~fxpress.backends.tvm.rpc.RemoteDevice` (``rpc``/``rpc_key`` compile options) the
builds stay in this process but are exported as shared libraries, and candidates and default
schedules are timed on a server behind TVM's RPC tracker by MetaSchedule's ``RPCRunner`` (see
:mod:`fxpress.backends.tvm.rpc`); the records go to the same database.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import platform
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder.local_builder import default_export
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, PyRunnerFuture, RunnerResult
from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

log = logging.getLogger(__name__)

EVALUATOR = EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)
TRIALS_PER_ITERATION = 16
MIN_TRIALS_PER_TASK = 32


def build_candidate(mod: tvm.IRModule, target):
    """MetaSchedule's default_build without its 38 s ``import tvm.s_tir.tensor_intrin``."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target)


@derived_object
class InProcessBuilder(PyBuilder):
    """Builds each candidate in this process (no worker pool, no start-up per batch).

    export: library, target -> artifact path (MetaSchedule's tar of objects by default; a .so for
    an RPC server)."""

    def __init__(self, export=None):
        super().__init__()
        self.export = export

    def build(self, build_inputs):
        results = []
        for build_input in build_inputs:
            try:
                library = build_candidate(build_input.mod, build_input.target)
                artifact = self.export(library, build_input.target) if self.export else default_export(library)
                results.append(BuilderResult(artifact, None))
            except Exception as err:  # noqa: BLE001 - a bad candidate is a failed build, not a crash
                results.append(BuilderResult(None, f"build failed: {type(err).__name__}: {err}"))
        return results


@derived_object
class _Finished(PyRunnerFuture):
    def __init__(self, seconds=None, error=None):
        super().__init__()
        self.seconds, self.error = seconds, error

    def done(self) -> bool:
        return True

    def result(self) -> RunnerResult:
        return RunnerResult(self.seconds, self.error)


def measure_library(library, args_info, device) -> list[float]:
    """Seconds per run of a built PrimFunc library on random arguments."""
    fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure", allow_missing=True)
    arguments = alloc_argument_common(fill, device, [info.as_json() for info in args_info], 1)
    return run_evaluator_common(library, device, EVALUATOR, arguments)


@derived_object
class InProcessRunner(PyRunner):
    """Times each candidate in this process with ``time_evaluator``."""

    def run(self, runner_inputs):
        futures = []
        for runner_input in runner_inputs:
            try:
                library = tvm.runtime.load_module(runner_input.artifact_path)
                device = tvm.runtime.device(runner_input.device_type, 0)
                futures.append(_Finished(measure_library(library, runner_input.args_info, device)))
            except Exception as err:  # noqa: BLE001 - a crashing candidate is a failed run
                futures.append(_Finished(error=f"run failed: {type(err).__name__}: {err}"))
        return futures


@dataclass
class TuningReport:
    """What one tuning call did: functions seen, functions tuned now, the trial budget given to
    MetaSchedule (it may stop early when a small space is exhausted), seconds."""

    tasks: int = 0
    tuned: list[str] = field(default_factory=list)
    trials: int = 0
    seconds: float = 0.0
    cost_model: str | None = None  # xgb (xgboost installed) or random; None when nothing was tuned
    rpc: str | None = None  # "key@host:port" when measured through an RPC tracker


def open_database(tuning_dir: str | Path) -> ms.database.JSONDatabase:
    Path(tuning_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(tuning_dir))


def has_record(database, task) -> bool:
    module = task.dispatched[0]
    return database.has_workload(module) and bool(database.get_top_k(database.commit_workload(module), 1))


def default_schedule(func: tvm.tirx.PrimFunc, target) -> tvm.s_tir.Schedule:
    """fxpress's default CPU schedule of one function (its trace replays it), or TVM's naive loops."""
    from fxpress.backends.tvm.schedules import cpu_rules

    with target:
        for rule in cpu_rules():
            scheduled = rule.apply(func, target, False)
            if isinstance(scheduled, list):
                scheduled = scheduled[0] if scheduled else None
            if scheduled is not None:
                return scheduled
    naive = tvm.s_tir.Schedule(func)
    with contextlib.suppress(Exception):  # a function without a root block keeps the empty trace
        naive.get_sblock("root")  # a trace of one lookup: the database's get_top_k skips a record with an empty one
    return naive


def record_default_schedule(database, task, target, runner=None, export_root: str | None = None) -> float:
    """Measure the default schedule of `task`, commit it as a tuning record; its seconds per run.
    runner: an RPC runner (:func:`fxpress.backends.tvm.rpc.make_runner`) to time it remotely (the
    library exported under `export_root`)."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    module = task.dispatched[0]
    func = module["main"]
    schedule = default_schedule(func, target)
    args_info = ArgInfo.from_prim_func(func)
    library = build_candidate(schedule.mod, target)
    if runner is None:
        seconds = measure_library(library, args_info, tvm.cpu())
    else:
        from fxpress.backends.tvm.rpc import measure_remote

        seconds = measure_remote(runner, library, args_info, target, export_root)
    database.commit_tuning_record(ms.database.TuningRecord(
        schedule.trace, database.commit_workload(module), seconds, target, args_info))
    return sorted(seconds)[len(seconds) // 2]


def measurable(task) -> bool:
    """Only float arguments: random integer inputs (indices of a take/gather) would read out of
    bounds and crash this process, so such functions keep their default schedule, untimed."""
    return all(str(param.dtype).startswith(("float", "bfloat")) for param in task.dispatched[0]["main"].params)


def called_by_main(mod: tvm.IRModule) -> set[str]:
    """Names of the PrimFuncs ``main`` calls (not those of ``main_transform_params``, run once)."""
    from tvm import relax

    names: set[str] = set()
    relax.analysis.post_order_visit(
        mod["main"], lambda expr: names.add(expr.name_hint) if isinstance(expr, tvm.ir.GlobalVar) else None)
    return names


def _search() -> tuple[str, str]:
    """(cost model, strategy): xgb + evolutionary when xgboost is installed; else random + replay-trace
    (evolving 2048 candidates ranked by a random model costs ~1 s per trial for nothing)."""
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return "random", "replay-trace"
    return "xgb", "evolutionary"


@contextlib.contextmanager
def _x86_tensor_intrinsics_only(target):
    """Register only the x86 tensor intrinsics while MetaSchedule sets up (0.7 s, not 38 s).

    ``TuneContext`` does ``import tvm.s_tir.tensor_intrin``, whose package imports every
    backend's intrinsics (CUDA, ROCm, Hexagon...); MetaSchedule's x86 rules need only
    ``x86`` (they look ``dot_16x4_vnni`` up when made).  A stand-in package with the real
    path loads just ``x86``; it is removed afterwards, so a later real import still
    loads the rest (``x86`` stays imported and is not registered twice).
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules or target.kind.name != "llvm" or platform.machine() not in ("x86_64", "AMD64"):
        yield
        return
    import tvm.s_tir

    package = types.ModuleType(name)
    package.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    sys.modules[name] = package
    try:
        importlib.import_module(f"{name}.x86")
        yield
    finally:
        if sys.modules.get(name) is package:
            del sys.modules[name]


@contextlib.contextmanager
def _foreign_handlers_detached():
    """MetaSchedule configures its logger with dictConfig, listing the logger's handlers by name; a
    handler someone else attached (pytest's log capture, an application's own) is not in that config,
    and the tuning failed with "'NoneType' object has no attribute 'format'".  They are taken off for
    the tuning and put back after."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith("tvm.s_tir.meta_schedule")]
    for handler in foreign:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in foreign:
            logger.addHandler(handler)


def tune(mod: tvm.IRModule, target, tuning_dir: str | Path, trials: int,
         min_trials_per_task: int = MIN_TRIALS_PER_TASK, remote=None) -> TuningReport:
    """Tune the functions of a fused module into the database in `tuning_dir`.

    Only functions without a record are measured (default schedule) and tuned; the slowest
    per call of ``main`` (default latency x uses) get the `trials`, >= `min_trials_per_task` each.
    remote: a :class:`fxpress.backends.tvm.rpc.RemoteDevice`: measure on its tracker's servers.
    """
    with contextlib.ExitStack() as cleanup:
        return _tune(mod, target, tuning_dir, trials, min_trials_per_task, remote, cleanup)


def _tune(mod, target, tuning_dir, trials, min_trials_per_task, remote, cleanup) -> TuningReport:
    start = time.perf_counter()
    database = open_database(tuning_dir)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    todo = [task for task in tasks if measurable(task) and not has_record(database, task)]
    report = TuningReport(tasks=len(tasks))
    builder, runner = InProcessBuilder(), InProcessRunner()
    remote_runner, export_root = None, None
    if remote is not None:
        from fxpress.backends.tvm import rpc

        report.rpc = f"{remote.key}@{remote.address}"
        if todo:
            rpc.check_tracker(remote)  # a clear error now, not a hang in the runner's worker
            export_root = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fxpress-rpc-"))
            builder = InProcessBuilder(export=lambda library, target: rpc.export_for_upload(library, target,
                                                                                            export_root))
            runner = remote_runner = rpc.make_runner(remote, EVALUATOR)
    per_call = {task.task_name: record_default_schedule(database, task, target, remote_runner, export_root)
                * task.weight for task in todo}
    in_main = called_by_main(mod)
    candidates = sorted((task for task in todo if task.task_name in in_main),
                        key=lambda task: per_call[task.task_name], reverse=True)
    chosen = candidates[:max(trials // min_trials_per_task, 1)] if trials else []
    if chosen:
        cost_model, strategy = _search()
        with _x86_tensor_intrinsics_only(target), _foreign_handlers_detached():
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                chosen, work_dir=str(tuning_dir), strategy=strategy, num_threads=1, seed=0)
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(tuning_dir), max_trials_global=trials,
                          num_trials_per_iter=min(TRIALS_PER_ITERATION, trials), builder=builder,
                          runner=runner, database=database, cost_model=cost_model)
        report.tuned = [task.task_name for task in chosen]
        report.trials = trials
        report.cost_model = cost_model
    report.seconds = time.perf_counter() - start
    log.info("tuned %d of %d functions (%d trials) in %.1f s", len(report.tuned), report.tasks, report.trials,
             report.seconds)
    return report
