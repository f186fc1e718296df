"""The `fxpress` command: passes, capture, dump, run, sweep, generate, bench, demo.

Arguments are parsed and the pipeline is checked against the target
(:mod:`fxpress.cli.target_check`) before torch is imported, so a bad
invocation fails in a fraction of a second; the commands load afterwards.
"""
from __future__ import annotations

import argparse
import logging
import sys

from fxpress.errors import FxpressError

DEMO_MODEL = "vit-mnist"
DEMO_PIPELINE = "fold-constants,fuse-batchnorm,merge-tokens{r=10,schedule=decreasing},dce"


MODEL_HELP = ("zoo name (vit-mnist, minilm, smollm2, cnn-digits, bnn-digits, gdnet-lite), a Hugging Face model folder, "
              "a .gguf file, or path/to/file.py:factory")


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--task", help="task of a Hugging Face folder or GGUF file: causal-lm, classification or "
                                       "embedding (default: from its config's architecture)")


def _add_model(parser: argparse.ArgumentParser) -> None:
    _add_model_argument(parser)
    parser.add_argument("--static", action="store_true", help="capture with static shapes")
    parser.add_argument("--method", default="export", choices=("export", "symbolic_trace"))


def _add_pipeline_options(parser: argparse.ArgumentParser, pipeline_default: str | None) -> None:
    parser.add_argument("--pipeline", default=pipeline_default,
                        help='passes as text, e.g. "fold-constants,dce"' +
                             (" (or --recipe FILE)" if pipeline_default is None else ""))
    parser.add_argument("--target", default="eager",
                        help="eager (PyTorch), or compile for llvm, onnx, native, cuda, aarch64, c")
    parser.add_argument("--dump-dir", help="write 000_capture.txt, 001_<pass>.txt, ... here")
    parser.add_argument("--dump-format", default="txt",
                        help="comma list of txt,dot,json,svg,png,model-explorer,onnx,pt2 (model-explorer: "
                             "Google Model Explorer JSON; onnx: for Netron; pt2: torch.export.save)")
    parser.add_argument("--dump-changed-only", action="store_true",
                        help="with --dump-dir: dump the capture, then only the passes that changed the graph "
                             "(the numbers keep each pass's position)")
    parser.add_argument("--print-after", action="store_true", help="print the IR after every pass")
    parser.add_argument("--calibration", default="4", metavar="N|SOURCE",
                        help="calibration data: N batches of the model's own training data (0: none; "
                             "default 4), or a SOURCE: text:FILE (a UTF-8 text file, for causal LMs) or a "
                             "dataset name (its train split), with --calibration-batches batches")
    parser.add_argument("--calibration-batches", type=int, default=4, metavar="N",
                        help="batches to draw from a --calibration SOURCE (default 4)")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxpress", description="Compress neural networks like a compiler.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("passes", help="list every pass with its options and docstring")
    p.add_argument("--verbose-docs", action="store_true", help="show whole docstrings")
    p.set_defaults(handler="cmd_passes")

    p = sub.add_parser("capture", help="capture MODEL and print its IR")
    _add_model(p)
    p.add_argument("--collapse", type=int, default=None, help="one line per module at this depth")
    p.set_defaults(handler="cmd_capture")

    p = sub.add_parser("dump", help="write the IR of MODEL as txt, dot, json (svg/png with graphviz), "
                                    "Model Explorer JSON, ONNX or .pt2")
    _add_model(p)
    p.add_argument("--format", default="txt",
                   help="comma list of txt,dot,json,svg,png,model-explorer,onnx,pt2 (see docs/graph-exports.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(handler="cmd_dump")

    p = sub.add_parser("run", help="run a pass pipeline on MODEL and print the per-pass table")
    _add_model_argument(p)
    _add_pipeline_options(p, None)
    p.add_argument("--recipe", metavar="FILE.yaml",
                   help="run a recipe instead of --pipeline: pipeline, calibration, target, eval, exports and "
                        "report in one YAML file (docs/recipes.md); the same graph as fxpress.compress")
    p.add_argument("--out", help="save the compiled model here (with --target)")
    p.add_argument("--tune-trials", type=int, default=0,
                   help="MetaSchedule trials (target llvm; 0: default schedules)")
    p.add_argument("--tuning-dir", help="tuning database folder; later runs reuse it")
    p.add_argument("--rpc", metavar="HOST:PORT",
                   help="with --tune-trials: time the tuning candidates on the servers of this TVM RPC tracker "
                        "(target llvm, or aarch64 on a board running 'python -m tvm.exec.rpc_server')")
    p.add_argument("--rpc-key", metavar="NAME", help="with --rpc: the key the tracker's servers registered under")
    p.add_argument("--eval", metavar="SPEC",
                   help="report a metric before and after the pipeline: default (the model's own task "
                        "metric), text:FILE (perplexity of a causal LM on a UTF-8 text file), or a dataset: "
                        "shakespeare, pydoc-topics (perplexity), stdlib-docs, pydoc-topics (encoder MRR), "
                        "digits, mnist-5k (accuracy)")
    p.add_argument("--eval-items", type=int, metavar="N",
                   help="with --eval: score only the first N images, query pairs or token blocks")
    p.add_argument("--dump-tvm-ir", metavar="DIR",
                   help="with a TVM --target: write the lowered Relax module and the scheduled TIR as text to DIR")
    p.add_argument("--export-hf", metavar="DIR",
                   help="write the compressed model as a Hugging Face folder (config + safetensors) to DIR")
    p.add_argument("--report", metavar="FILE.html",
                   help="write an HTML report of the run: the pass table, what each pass changed, charts")
    p.set_defaults(handler="cmd_run")

    p = sub.add_parser("sweep", help="run a grid of pipelines (r=[4,8,12]) on MODEL; Pareto front and best recipe")
    _add_model_argument(p)
    p.add_argument("--pipeline", required=True, help='a pipeline whose bracketed option values are axes to '
                                                     'try, e.g. "merge-tokens{r=[0,4,8,12]}" (several: their grid)')
    p.add_argument("--workers", type=int, default=1, help="points run at once, each in its own process "
                                                          "with one thread (default 1: one after another here)")
    p.add_argument("--eval", default="default", metavar="SPEC", help="the metric's data, as for run --eval")
    p.add_argument("--eval-items", type=int, metavar="N", help="score only the first N items")
    p.add_argument("--calibration", default="4", metavar="N|SOURCE", help="as for run (default 4 batches)")
    p.add_argument("--calibration-batches", type=int, default=4, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", default="macs", choices=("macs", "params", "latency"),
                   help="the cost the front and the best recipe minimize, against the metric (default macs)")
    p.add_argument("--tolerance", type=float, metavar="X",
                   help="best recipe: the cheapest point on the front, cheaper than the baseline, whose metric "
                        "is within X of the baseline's (absolute for accuracy and MRR, default 0.01; relative "
                        "for perplexity, default 0.05)")
    p.add_argument("--report", metavar="FILE.html",
                   help="write an HTML report; beside it the Pareto plots (SVG, PNG) and FILE.json (every number)")
    p.add_argument("--recipe-out", metavar="FILE.yaml",
                   help="where to write the best recipe (default <report>.best.yaml, else sweep-best.yaml)")
    p.add_argument("--max-points", type=int, default=64, metavar="N", help="largest grid to run (default 64)")
    p.add_argument("--no-latency", action="store_true", help="skip timing the points")
    p.set_defaults(handler="cmd_sweep")

    p = sub.add_parser("generate", help="generate text with a decoder through a compressed KV cache")
    _add_model_argument(p)
    p.add_argument("--prompt", required=True, help="the prompt text (or @FILE to read it from a file)")
    p.add_argument("--cache", default="full", metavar="POLICY",
                   help='KV cache policy, e.g. "quant{bits=4}", "snapkv{keep=0.5}+quant{bits=4}", "minicache" '
                        "(docs/kv.md; default full)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    p.add_argument("--target", default="eager", choices=("eager", "export", "llvm"),
                   help="eager (PyTorch), export (the captured graphs) or llvm (compiled by TVM)")
    p.add_argument("--pipeline", metavar="PIPELINE",
                   help='compress the weights first, e.g. "quantize{bits=4,zero=int}" (passes that keep the '
                        "architecture: quantize, quantized-distill, diff-quant, distill); a TVM target runs the "
                        "packed codes")
    p.add_argument("--calibration", default="4", metavar="N|SOURCE", help="with --pipeline: as for run (default 4)")
    p.add_argument("--calibration-batches", type=int, default=4, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the text, tokens and numbers as JSON")
    p.set_defaults(handler="cmd_generate")

    p = sub.add_parser("bench", help="time a saved compiled model (see run --target T --out DIR)")
    p.add_argument("dir")
    p.set_defaults(handler="cmd_bench")

    p = sub.add_parser("demo", help="compress the default model and report before/after")
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--batch", type=int, default=64, help="batch size for latency")
    p.add_argument("--report", metavar="FILE.html", default="fxpress-demo.html",
                   help="where to write the HTML report of the demo (default fxpress-demo.html; '' for none)")
    _add_pipeline_options(p, DEMO_PIPELINE)
    p.set_defaults(handler="cmd_demo", target="llvm")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run" and (args.recipe or not args.pipeline):
            check_recipe_arguments(args)
        elif args.command in ("run", "demo"):
            from fxpress.cli.target_check import check_pipeline_target

            check_pipeline_target(args.pipeline, args.target)
        from fxpress.cli import commands  # imports torch, which sets up its own loggers

        if not args.verbose:  # torch.export logs warnings about user code it could not map; noise here
            logging.getLogger("torch").setLevel(logging.ERROR)

        commands.set_threads(args.threads)
        commands.join_processes()  # under torchrun; a single process is left as it is
        code = getattr(commands, args.handler)(args)
        from fxpress.utils import distributed

        distributed.close()
        return code
    except FxpressError as err:
        _error(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


# `run` options a recipe may come with: where debug output goes, and the report (which overrides the recipe's)
RECIPE_COMPANIONS = {"command", "handler", "verbose", "threads", "model", "task", "recipe", "pipeline", "report",
                     "dump_dir", "dump_format", "dump_changed_only", "print_after"}


def check_recipe_arguments(args: argparse.Namespace) -> None:
    """`run`: exactly one of --pipeline and --recipe; no option the recipe sets; the recipe's keys, its
    model (against MODEL), pipeline and target checked before torch is imported."""
    if args.pipeline and args.recipe:
        raise FxpressError("give --pipeline or --recipe, not both (a recipe holds its pipeline)")
    if not args.recipe:
        raise FxpressError("run needs --pipeline PASSES or --recipe FILE.yaml")
    defaults = vars(build_parser().parse_args(["run", args.model]))
    given = [f"--{key.replace('_', '-')}" for key, value in vars(args).items()
             if key not in RECIPE_COMPANIONS and value != defaults.get(key)]
    if given:
        raise FxpressError(f"{', '.join(given)}: the recipe {args.recipe} sets this; change the recipe "
                           "(docs/recipes.md) or run with --pipeline")
    from fxpress.cli.target_check import check_pipeline_target
    from fxpress.errors import PipelineError
    from fxpress.recipes.recipe import check_model, load_recipe

    recipe = load_recipe(args.recipe, deep=False)
    check_model(recipe, args.model)
    try:
        check_pipeline_target(recipe.pipeline, recipe.target)
    except PipelineError as err:
        raise recipe.fail("pipeline", str(err)) from err
    except FxpressError as err:
        raise recipe.fail("target", str(err)) from err


def _error(line: str) -> None:
    """One line on stderr (plain text: rich would need the commands' imports)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
