"""The `fxpress` subcommands. Each takes parsed args and returns an exit code."""
from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from fxpress.backends import available_targets
from fxpress.cli import DEMO_MODEL, DEMO_PIPELINE  # noqa: F401 - the parser's defaults, kept importable here
from fxpress.cli.render import RichProgress, compare_table, console, errors, human, pass_table
from fxpress.errors import DataError, FxpressError
from fxpress.ir import Graph, capture
from fxpress.ir.numerics import compare_outputs
from fxpress.ir.opinfo import op_qualname
from fxpress.ops.sparse import SPARSE_LINEAR
from fxpress.ir.printer import format_graph
from fxpress.passes import PassManager, PrintAfterPass, registered_passes
from fxpress.passes.infra.instruments import Instrument
from fxpress.passes.infra.registry import format_type, format_value, pass_options
from fxpress.eval import Source, calibration_batches, evaluate, parse_source
from fxpress.eval.evaluate import check_evaluable, describe_data
from fxpress.recipes.recipe import Calibration, Export, Recipe
from fxpress.recipes.run import run_passes
from fxpress.report import RunRecorder, run_report
from fxpress.zoo.specs import resolve_model
from fxpress.utils import distributed
from fxpress.utils.timing import interleaved_latency
from fxpress.zoo import ZooModel

log = logging.getLogger(__name__)

TARGETS = ("eager", *available_targets())


def cmd_passes(args) -> int:
    """List every pass with its options and docstring."""
    table = Table(title="passes", show_lines=True)
    for column in ("pass", "preserves", "options", "rewrite"):
        table.add_column(column)
    for name, cls in registered_passes().items():
        hints = typing.get_type_hints(cls)
        options = "\n".join(f"{f.name}: {format_type(hints[f.name])} = {format_value(_default(f))}"
                            for f in pass_options(cls)) or "-"
        doc = (cls.__doc__ or "").strip() if args.verbose_docs else cls.summary()
        table.add_row(name, "yes" if cls.preserves_semantics else "no (lossy)", escape(options), escape(doc))
    console.print(table)
    return 0


def _default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "required"


def _capture(model: ZooModel, static: bool = False, method: str = "export") -> Graph:
    dynamic = False if static or method != "export" else (model.dynamic_dims or False)
    with console.status(f"capturing {model.name} ({method})..."):
        return capture(model.module, model.example_inputs, dynamic=dynamic, method=method, name=model.name)


def _load(spec: str, task: str | None = None) -> ZooModel:
    with console.status(f"loading {spec}..."):
        return resolve_model(spec, task=task)


def cmd_capture(args) -> int:
    """Capture MODEL and print its IR with shapes and module paths."""
    model = _load(args.model, getattr(args, "task", None))
    graph = _capture(model, args.static, args.method)
    console.print(format_graph(graph, collapse=args.collapse), markup=False, highlight=False, soft_wrap=True)
    eager_params = sum(p.numel() for p in model.module.parameters())
    with torch.no_grad():
        error = compare_outputs(model.module(*model.example_inputs), graph(*model.example_inputs))
    console.print(f"params: graph {graph.num_params:,}, model {eager_params:,} "
                  f"({'equal' if graph.num_params == eager_params else 'DIFFERENT'}); "
                  f"MACs {human(graph.macs)}; nodes {graph.num_nodes}; "
                  f"capture vs eager max abs error {error.max_abs:.3g}", markup=False)
    return 0


def cmd_dump(args) -> int:
    """Write the IR of MODEL as text, DOT, JSON, Model Explorer JSON, ONNX and/or .pt2."""
    from fxpress.export.graph_files import parse_formats, write_graph_files

    formats = parse_formats(args.format)  # a typo fails before the model loads
    model = _load(args.model, getattr(args, "task", None))
    graph = _capture(model, args.static, args.method)
    written = write_graph_files(graph, Path(args.out), model.name.replace(":", "_"), formats)
    for path in written:
        console.print(f"wrote {path}", markup=False)
    return 0


def calibration_plan(args) -> tuple[Source, int]:
    """(source, batches) from --calibration N|SOURCE and --calibration-batches; checked before any model loads."""
    text = str(args.calibration).strip()
    if text.lstrip("-").isdigit():
        count = int(text)
        if count < 0:
            raise DataError(f"--calibration {count}: the number of batches must be >= 0")
        return Source("default"), count
    if args.calibration_batches < 1:
        raise DataError(f"--calibration-batches must be >= 1 with --calibration {text}")
    return parse_source(text), args.calibration_batches


def recipe_of(args, pipeline: str) -> Recipe:
    """The recipe a plain `fxpress run` / `demo` amounts to: its pipeline, calibration, target and seed."""
    source, count = calibration_plan(args)
    return Recipe(pipeline=pipeline, calibration=Calibration(source=str(source), batches=count), target=args.target,
                  seed=args.seed)


def run_pipeline(model: ZooModel, pipeline: str, args, recorder: Instrument | None = None) -> tuple[Graph, Graph, list]:
    """Capture, then run `pipeline` as a recipe run does (verification and numeric checks after every pass;
    `recorder`, a report's RunRecorder, sees every pass too); print the table."""
    if args.target not in TARGETS:
        raise FxpressError(f"unknown target '{args.target}'; available targets: {', '.join(TARGETS)}")
    # parse and check against the target before the slow work, so typos and impossible targets fail fast
    PassManager(pipeline, target=None if args.target == "eager" else args.target)
    graph = _capture(model)
    result = run_passes(model, graph, recipe_of(args, pipeline), progress=RichProgress(),
                        instruments=[*([recorder] if recorder else []), *debug_instruments(args)])
    console.print(pass_table(result.reports))
    return graph, result.graph, result.reports


def cmd_run(args) -> int:
    """Run a pipeline on MODEL and print the per-pass table (and, with --eval, the metric before and after)."""
    from fxpress.cli.compile_cmds import check_dump_options, check_rpc_options

    check_dump_options(args)
    check_rpc_options(args)
    if getattr(args, "recipe", None):
        return run_recipe_file(args)
    eval_source = parse_source(args.eval) if args.eval else None  # a bad file or name fails before loading
    calibration, count = calibration_plan(args)
    model = _load(args.model, getattr(args, "task", None))
    if eval_source is not None:
        check_evaluable(model, eval_source)
    if count and calibration.kind != "default":
        check_evaluable(model, calibration, "calibration")
    recorder = RunRecorder() if args.report and distributed.is_main() else None
    captured, compressed, reports = run_pipeline(model, args.pipeline, args, recorder)
    if not distributed.is_main():  # under torchrun only rank 0 evaluates, compiles and writes
        return 0
    if args.dump_dir:
        console.print(f"dumps in {args.dump_dir}", markup=False)
    metrics = print_metrics(model, captured, compressed, eval_source, args.eval_items) if eval_source else {}
    compiled = None
    if args.target == "native":
        run_on_native(model, compressed, args)
    elif args.target != "eager":
        from fxpress.cli.compile_cmds import compile_and_save

        compiled = compile_and_save(compressed, args.target, args.out, console,
                                    tune_trials=args.tune_trials, tuning_dir=args.tuning_dir,
                                    dump_ir=args.dump_tvm_ir, rpc=getattr(args, "rpc", None),
                                    rpc_key=getattr(args, "rpc_key", None))
    elif args.out:
        raise FxpressError("--out saves a compiled model: pass --target too (e.g. --target llvm)")
    if args.export_hf:
        export_hugging_face(model, compressed, args.export_hf)
    if args.report:
        compile_info = [compiled_row(args.target, compiled, compressed, model.example_inputs)] if compiled else []
        write_report(args.report, model, args.pipeline, captured, compressed, reports, recorder,
                     metrics=metrics, compile_info=compile_info)
    return 0


def debug_instruments(args) -> list[Instrument]:
    """--dump-dir and --print-after as pass instruments."""
    instruments: list[Instrument] = []
    if not distributed.is_main():  # under torchrun only rank 0 writes
        return instruments
    if args.dump_dir:
        from fxpress.cli.compile_cmds import dump_instrument

        instruments.append(dump_instrument(args))
    if args.print_after:
        instruments.append(PrintAfterPass(stream=console.file))
    return instruments


def compress_recipe(args):
    """`run MODEL --recipe FILE` up to the compressed model: `fxpress.compress` with the recipe, so the graph is
    the one Python gets; the CLI adds a progress bar, --dump-dir / --print-after and --report."""
    from fxpress.recipes.compress import compress
    from fxpress.recipes.recipe import check_model, load_recipe

    recipe = load_recipe(args.recipe)
    check_model(recipe, args.model)
    report = getattr(args, "report", None)
    if not distributed.is_main():  # under torchrun only rank 0 evaluates, compiles and writes
        recipe, report = dataclasses.replace(recipe, target="eager", eval=None, export=Export(), report=None), None
    model = _load(args.model, getattr(args, "task", None))
    return compress(model, recipe, progress=RichProgress(), instruments=debug_instruments(args), report=report)


def run_recipe_file(args) -> int:
    """`run MODEL --recipe FILE`: compress as the recipe says, then print the pass table, the metrics, the
    compilation and what the recipe wrote."""
    done = compress_recipe(args)
    model = done.model
    console.print(pass_table(done.reports))
    if args.dump_dir:
        console.print(f"dumps in {args.dump_dir}", markup=False)
    if done.metrics:
        console.print(compare_table(f"{model.name}: before vs after the pipeline", done.metrics))
    if done.compiled is not None:
        console.print(f"compiled for {done.compiled.target} in {done.compiled.info['compile_s']:.1f} s"
                      + (f"; tuning: {done.compiled.info['tuning']}" if "tuning" in done.compiled.info else ""),
                      markup=False)
    for key, path in done.written.items():
        console.print(f"{key}: wrote {path}", markup=False)
    return 0


def compiled_row(target: str, compiled, graph: Graph, inputs: tuple) -> dict[str, object]:
    """A row of the report's compile table: target, compile time, tuning, error vs the graph."""
    with torch.no_grad():
        error = compare_outputs(graph(*inputs), compiled(*inputs))
    row: dict[str, object] = {"target": target, "compile s": round(compiled.info["compile_s"], 2),
                              "max abs error vs graph": error.max_abs, "cosine vs graph": round(error.cosine, 6)}
    if "tuning" in compiled.info:
        row["tuning"] = str(compiled.info["tuning"])
    return row


def write_report(path: str, model: ZooModel, pipeline: str, before: Graph, after: Graph, reports: list,
                 recorder: RunRecorder | None, **sections) -> None:
    """--report FILE: the HTML report of the run."""
    with console.status(f"writing the report {path}..."):
        written = run_report(model_name=model.name, description=model.description, pipeline=pipeline,
                             before=before, after=after, reports=reports, recorder=recorder,
                             **sections).write(path)
    console.print(f"report: {written}", markup=False)


def print_metrics(model: ZooModel, before: Graph, after: Graph, source: Source,
                  items: int | None) -> dict[str, tuple[object, object]]:
    """The metric of the captured graph (equal to the eager model) and of the compressed one, as a table;
    returns the rows."""
    with console.status(f"evaluating {model.name} on {source}..."):
        metrics_before = evaluate(model, before, source, max_items=items)
        metrics_after = evaluate(model, after, source, max_items=items)
    data = describe_data(model, source)
    rows = {f"{name} ({data})": (value, metrics_after.get(name)) for name, value in metrics_before.items()}
    console.print(compare_table(f"{model.name}: before vs after the pipeline", rows))
    return rows


def export_hugging_face(model: ZooModel, graph: Graph, folder: str) -> None:
    """--export-hf DIR: the compressed graph as a Hugging Face model folder."""
    from fxpress.export.hf import export_hf

    with console.status(f"exporting {model.name} to {folder}..."):
        written = export_hf(graph, model.module, folder, tokenizer=model.tokenizer)
    console.print(f"exported a Hugging Face model to {written or folder}", markup=False)


def run_on_native(model: ZooModel, graph: Graph, args) -> None:
    """Compile for the native bit kernels, check they agree with the graph bit for bit, save if asked."""
    from fxpress.cli.compile_cmds import compile_for, save_compiled

    from fxpress.backends.native import OUTPUT_TOLERANCE, outputs_agree

    compiled = compile_for(graph, "native", console, dynamic=bool(graph.dynamic_shapes))
    kernels = compiled.info.get("quantized_kernels", {})
    with console.status("running the native kernels..."):
        batches = calibration_batches(model, count=2) or [model.example_inputs]
        agree = all(outputs_agree(compiled(*batch), graph(*batch), kernels) for batch in batches)
    if not agree:
        raise FxpressError("native kernels disagree with the graph on calibration inputs; please report this")
    if kernels:
        on_kernels = sum(1 for kernel in kernels.values() if not kernel.startswith("reference"))
        console.print(f"native: {on_kernels} of {len(kernels)} quantized linears on the C kernels "
                      f"(int8 activations: outputs within {OUTPUT_TOLERANCE:.0%} of the graph's largest)",
                      markup=False)
    lowered = compiled.info.get("native_layers", [])
    sparse = sum(1 for node in graph.fx.nodes if op_qualname(node.target) == op_qualname(SPARSE_LINEAR))
    if lowered or not (sparse or kernels):
        names = ", ".join(lowered) or "none (no binary layers: run binarize first)"
        console.print(f"native: lowered {len(lowered)} binary layers ({names}); outputs identical", markup=False)
    if sparse:
        console.print(f"native: {sparse} sparse linears run on the sparse C kernel; outputs identical", markup=False)
    if args.out:
        save_compiled(compiled, args.out, console)


def cmd_bench(args) -> int:
    """Time a saved compiled model."""
    from fxpress.cli.compile_cmds import cmd_bench as bench

    return bench(args, console)


def cmd_generate(args) -> int:
    """Generate text through a compressed KV cache; print it with tokens/s and the cache's bytes."""
    from fxpress.cli.generate_cmd import cmd_generate as generate

    return generate(args)


def cmd_sweep(args) -> int:
    """Run a grid of pipelines on MODEL; print the table, write the Pareto plots, report and best recipe."""
    from fxpress.cli.sweep_cmd import cmd_sweep as sweep

    return sweep(args)


def cmd_demo(args) -> int:
    """Compress the default model, compile it for the host CPU; report accuracy, params, MACs and
    latency (eager and compiled) before and after."""
    if not args.threads:  # 2 OpenMP threads on a busy 2-core machine time noise, not the model
        torch.set_num_threads(1)
    if args.target not in ("eager", "llvm", "onnx"):
        raise FxpressError(f"the demo times models on this machine: use --target llvm, onnx or eager, "
                           f"not {args.target!r} (fxpress run --target {args.target} --out DIR builds one)")
    model = _load(args.model, getattr(args, "task", None))
    console.print(f"[bold]{model.name}[/bold]: {model.description}")
    console.print(f"pipeline: {args.pipeline}", markup=False)
    recorder = RunRecorder() if args.report else None
    before, after, reports = run_pipeline(model, args.pipeline, args, recorder)
    with console.status("evaluating on the held-out split..."):
        metrics_before, metrics_after = evaluate(model, model.module), evaluate(model, after)
    rows: dict[str, tuple[object, object]] = {
        name: (metrics_before[name], metrics_after.get(name)) for name in metrics_before}
    rows |= {"params": (before.num_params, after.num_params), "MACs": (before.macs, after.macs),
             "nodes": (before.num_nodes, after.num_nodes)}
    inputs = _latency_inputs(model, args.batch)
    timed, compile_info = {"before": model.module, "after": after}, []
    if args.target != "eager":
        compiled, compile_info = _compile_for_demo(before, after, args.target, inputs)
        timed |= compiled
    with console.status(f"timing at batch {args.batch}..."):
        latency = interleaved_latency(timed, inputs)
    threads = f"batch {args.batch}, {torch.get_num_threads()} thread"
    latency_rows = {f"latency ms (eager, {threads})": (latency["before"].median_ms, latency["after"].median_ms)}
    if args.target != "eager":
        latency_rows[f"latency ms ({args.target}, {threads})"] = (latency[f"before {args.target}"].median_ms,
                                                                  latency[f"after {args.target}"].median_ms)
    console.print(compare_table(f"{model.name}: before vs after", rows | latency_rows))
    if args.report:
        metrics = {name: rows[name] for name in metrics_before}
        write_report(args.report, model, args.pipeline, before, after, reports, recorder, metrics=metrics,
                     latency=latency_rows, compile_info=compile_info)
    return 0


def _compile_for_demo(before: Graph, after: Graph, target: str, inputs: tuple) -> tuple[dict, list[dict]]:
    """Both graphs compiled for `target` at the timing inputs' shapes, checked against eager; and a
    report row for each.

    Static shapes: TVM's schedules pad and tile a known batch; a symbolic one runs slower.
    """
    from fxpress.backends import compile as compile_graph

    compiled, rows = {}, []
    for label, graph in (("before", before), ("after", after)):
        at_batch = Graph(graph.module, inputs, name=graph.name, source=graph.source)
        with console.status(f"compiling the {label} graph for {target}..."):
            program = compile_graph(at_batch, target)
        program.set_threads(torch.get_num_threads())
        row = {"graph": label, **compiled_row(target, program, graph, inputs)}
        console.print(f"{label}: compiled for {target} in {row['compile s']:.1f} s; "
                      f"max abs error vs eager {row['max abs error vs graph']:.2g}", markup=False)
        compiled[f"{label} {target}"] = program
        rows.append(row)
    return compiled, rows


def _latency_inputs(model: ZooModel, batch: int) -> tuple:
    if model.task == "classification" and model.dynamic_dims.get(0, {}).get(0) == "batch":
        return tuple(x[:1].expand(batch, *x.shape[1:]).contiguous() for x in model.example_inputs)
    return tuple(model.example_inputs)


def join_processes() -> None:
    """Under `torchrun --nproc-per-node N`: join the process group; every rank but 0 runs the same
    pipeline silently (passes split their calibration work and share results) and writes nothing."""
    if distributed.init_from_env() and not distributed.is_main():
        console.quiet = errors.quiet = True


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
