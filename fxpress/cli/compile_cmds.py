"""Command bodies for the CLI: `fxpress run ... --target T --out DIR`, `fxpress bench DIR`, and the
dump options of `fxpress run` (--dump-dir, --dump-format, --dump-changed-only, --dump-tvm-ir).

The CLI (fxpress/cli) registers these; they return exit codes and print
through the CLI's rich console.
"""
from __future__ import annotations

from pathlib import Path

from fxpress.backends import CompiledModel, available_targets, compile, load  # noqa: A004 - fxpress.compile
from fxpress.backends.registry import backend_for_target
from fxpress.errors import FxpressError
from fxpress.export.graph_files import GRAPH_FILE_WRITERS, parse_formats
from fxpress.ir import Graph
from fxpress.passes import DumpToDir


def compile_and_save(graph: Graph, target: str, out: str | None, console, tune_trials: int = 0,
                     tuning_dir: str | None = None, dump_ir: str | None = None, rpc: str | None = None,
                     rpc_key: str | None = None) -> CompiledModel:
    """After `fxpress run`'s pipeline: compile the result for `target`, save to `out`, report.
    dump_ir: a folder for TVM's IR as text (TVM targets).  rpc, rpc_key: tune through that RPC tracker."""
    options = {"dump_ir": dump_ir} if dump_ir else {}
    if rpc or rpc_key:
        options |= {"rpc": rpc, "rpc_key": rpc_key}
    compiled = compile_for(graph, target, console, tune_trials=tune_trials, tuning_dir=tuning_dir, **options)
    if dump_ir:
        console.print(f"TVM IR in {dump_ir}", markup=False)
    if out:
        save_compiled(compiled, out, console)
    return compiled


def check_dump_options(args) -> None:
    """Fail before any model loads for a bad --dump-format, --dump-changed-only without --dump-dir, or
    --dump-tvm-ir without a TVM target."""
    parse_formats(args.dump_format)
    if getattr(args, "dump_changed_only", False) and not args.dump_dir:
        raise FxpressError("--dump-changed-only says which passes --dump-dir dumps: pass --dump-dir DIR too")
    if getattr(args, "dump_tvm_ir", None):
        tvm_targets = sorted((t for t in available_targets() if backend_for_target(t).name == "tvm"),
                             key=lambda t: t != "llvm")
        if args.target not in tvm_targets:
            raise FxpressError(f"--dump-tvm-ir writes TVM's IR: use --target {tvm_targets[0]} (or "
                               f"{', '.join(tvm_targets[1:])}), not {args.target!r}")


def check_rpc_options(args) -> None:
    """Fail before any model loads for --rpc / --rpc-key without each other, without --tune-trials, or
    with a target that is not tuned (llvm; aarch64 on a board)."""
    rpc, key = getattr(args, "rpc", None), getattr(args, "rpc_key", None)
    if not rpc and not key:
        return
    if not rpc or not key:
        raise FxpressError("--rpc HOST:PORT (a TVM RPC tracker) and --rpc-key NAME (its servers' key) go together: "
                           f"pass {'--rpc-key' if rpc else '--rpc'} too")
    if getattr(args, "tune_trials", 0) <= 0:
        raise FxpressError("--rpc and --rpc-key time MetaSchedule's tuning candidates on a remote device: pass "
                           "--tune-trials N (N > 0) too; without tuning nothing is measured remotely")
    if args.target not in ("llvm", "aarch64"):
        raise FxpressError(f"--rpc tunes for --target llvm or aarch64, not {args.target!r}")


def dump_instrument(args) -> DumpToDir | None:
    """The DumpToDir of --dump-dir (every dump format, --dump-changed-only), or None without it."""
    if not args.dump_dir:
        return None
    return DumpToDir(args.dump_dir, formats=parse_formats(args.dump_format), writers=GRAPH_FILE_WRITERS,
                     changed_only=getattr(args, "dump_changed_only", False))


def compile_for(graph: Graph, target: str, console, **options) -> CompiledModel:
    """`fxpress.compile` with a status line and a report of the time (and tuning) on `console`."""
    if target not in available_targets():
        raise FxpressError(f"unknown target {target!r}; available: eager, {', '.join(available_targets())}")
    with console.status(f"compiling {graph.name} for {target}..."):
        compiled = compile(graph, target, **options)
    console.print(f"compiled for {target} in {compiled.info['compile_s']:.1f} s", markup=False)
    if "tuning" in compiled.info:
        console.print(f"tuning: {compiled.info['tuning']}", markup=False)
    return compiled


def save_compiled(compiled: CompiledModel, out: str, console) -> None:
    folder = compiled.save(Path(out))
    console.print(f"saved to {folder}", markup=False)


def cmd_bench(args, console) -> int:
    """`fxpress bench DIR [--threads N]`: load a saved model and time it on generated inputs."""
    compiled = load(args.dir)
    if getattr(args, "threads", None):
        compiled.set_threads(args.threads)
    with console.status(f"timing {compiled.name} ({compiled.target})..."):
        latency = compiled.latency()
    signature = ", ".join(spec.describe() for spec in compiled.inputs)
    console.print(f"{compiled.name} [{compiled.target}] ({signature}): median {latency.median_ms:.3f} ms, "
                  f"min {latency.min_ms:.3f} ms over {latency.runs} runs", markup=False)
    return 0
