"""The `fxpress` command: passes, capture, dump, run, demo.

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


MODEL_HELP = ("zoo name (vit-mnist, minilm, smollm2, cnn-digits, bnn-digits), a Hugging Face model folder, "
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
    parser.add_argument("--pipeline", default=pipeline_default, required=pipeline_default is None,
                        help='passes as text, e.g. "fold-constants,dce"')
    parser.add_argument("--target", default="eager",
                        help="eager (PyTorch), or compile for llvm, onnx, native, cuda, aarch64, c")
    parser.add_argument("--dump-dir", help="write 000_capture.txt, 001_<pass>.txt, ... here")
    parser.add_argument("--dump-format", default="txt", help="comma list of txt,dot,json,svg,png")
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

    p = sub.add_parser("dump", help="write the IR of MODEL as txt, dot, json (svg/png with graphviz)")
    _add_model(p)
    p.add_argument("--format", default="txt", help="comma list of txt,dot,json,svg,png")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(handler="cmd_dump")

    p = sub.add_parser("run", help="run a pass pipeline on MODEL and print the per-pass table")
    _add_model_argument(p)
    _add_pipeline_options(p, None)
    p.add_argument("--out", help="save the compiled model here (with --target)")
    p.add_argument("--tune-trials", type=int, default=0,
                   help="MetaSchedule trials (target llvm; 0: default schedules)")
    p.add_argument("--tuning-dir", help="tuning database folder; later runs reuse it")
    p.add_argument("--eval", metavar="SPEC",
                   help="report a metric before and after the pipeline: default (the model's own task "
                        "metric), text:FILE (perplexity of a causal LM on a UTF-8 text file), or a dataset: "
                        "shakespeare, pydoc-topics (perplexity), stdlib-docs, pydoc-topics (encoder MRR), "
                        "digits, mnist-5k (accuracy)")
    p.add_argument("--eval-items", type=int, metavar="N",
                   help="with --eval: score only the first N images, query pairs or token blocks")
    p.add_argument("--export-hf", metavar="DIR",
                   help="write the compressed model as a Hugging Face folder (config + safetensors) to DIR")
    p.set_defaults(handler="cmd_run")

    p = sub.add_parser("bench", help="time a saved compiled model (see run --target T --out DIR)")
    p.add_argument("dir")
    p.set_defaults(handler="cmd_bench")

    p = sub.add_parser("demo", help="compress the default model and report before/after")
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--batch", type=int, default=64, help="batch size for latency")
    _add_pipeline_options(p, DEMO_PIPELINE)
    p.set_defaults(handler="cmd_demo", target="llvm")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("run", "demo"):
            from fxpress.cli.target_check import check_pipeline_target

            check_pipeline_target(args.pipeline, args.target)
        from fxpress.cli import commands  # imports torch, which sets up its own loggers

        if not args.verbose:  # torch.export logs warnings about user code it could not map; noise here
            logging.getLogger("torch").setLevel(logging.ERROR)

        commands.set_threads(args.threads)
        return getattr(commands, args.handler)(args)
    except FxpressError as err:
        _error(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _error(line: str) -> None:
    """One line on stderr (plain text: rich would need the commands' imports)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
