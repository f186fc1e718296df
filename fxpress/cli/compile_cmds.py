"""Command bodies for the CLI: `fxpress run ... --target T --out DIR` and `fxpress bench DIR`.

The CLI (fxpress/cli) registers these; they return exit codes and print
through the CLI's rich console.
"""
from __future__ import annotations

from pathlib import Path

from fxpress.backends import CompiledModel, available_targets, compile, load  # noqa: A004 - fxpress.compile
from fxpress.errors import FxpressError
from fxpress.ir import Graph


def compile_and_save(graph: Graph, target: str, out: str | None, console, tune_trials: int = 0,
                     tuning_dir: str | None = None) -> CompiledModel:
    """After `fxpress run`'s pipeline: compile the result for `target`, save to `out`, report."""
    compiled = compile_for(graph, target, console, tune_trials=tune_trials, tuning_dir=tuning_dir)
    if out:
        save_compiled(compiled, out, console)
    return compiled


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
