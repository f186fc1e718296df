"""Batch-1 decode steps of SmolLM2 with quantized weights, compiled by TVM, against fp32 eager, one run.

    python benchmarks/quant_decode.py --quick --json /tmp/qd.json     # int4 only, 16 tokens, 3 rounds
    python benchmarks/quant_decode.py --json /tmp/qd.json             # int4 and int8, 64 tokens, 5 rounds

Each weight form is the zoo model's captured graph after a `quantize` pipeline, handed back to the
modules generation runs (`fxpress.generation.with_graph_weights`); generation then captures its
explicit-cache decode step, so the step holds `fxpress::quantized_linear` and the llvm target runs
the packed codes through the TVM GEMV (`backends/tvm/quant_rules.py`).  The prompt is short (the
prefill runs eagerly; only the decode step is compiled), the cache is full, decoding is greedy.

Rows: weights, target, tokens_per_s, step_ms (median over rounds), ratio_to_fp32_eager (tokens/s over
fp32 eager's: > 1 is faster), same_tokens (the greedy tokens equal the eager graph's of the same
weights: fp32 compiled vs fp32 eager, int4 compiled vs the eager int4 graph), weight_bytes (the
decode step's stored weights), compile_s.  Timing: the configurations take turns within each round
(machine noise hits them alike); wall time per decoded token, at `--threads` (default 1).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import fxpress
from fxpress.generation import Generator, with_graph_weights
from fxpress.passes import PassContext, PassManager
from fxpress.zoo import load_model

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"  # < 34 tokens: prefill runs eagerly
FORMS = {"int4": "quantize{bits=4,group=32,zero=int}", "int8": "quantize{bits=8,group=64,scheme=sym}"}


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors a decode step reads (each shared tensor once)."""
    seen = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def build(zoo, forms: list[str]) -> dict[str, tuple[torch.nn.Module, dict]]:
    graph = fxpress.capture(zoo.module, zoo.example_inputs)
    weights = {"fp32": (zoo.module, {})}
    for form in forms:
        started = time.perf_counter()
        quantized = PassManager(FORMS[form]).run(graph, PassContext()).graph
        weights[form] = (with_graph_weights(zoo.module, quantized),
                         {"pipeline": FORMS[form], "quantize_s": round(time.perf_counter() - started, 1)})
    return weights


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    zoo = load_model("smollm2")
    weights = build(zoo, args.forms)
    configs = []
    for name, (module, facts) in weights.items():
        for target in ("eager", "llvm"):
            started = time.perf_counter()
            generator = Generator(module, zoo.tokenizer, target=target)
            first = generator.generate(PROMPT, 2, stop_at_eos=False)  # builds the decode step
            configs.append({"weights": name, "target": target, "generator": generator, "facts": facts,
                            "compile_s": round(time.perf_counter() - started, 1) if target != "eager" else 0.0,
                            "prompt_tokens": first.prompt_tokens, "steps": [], "tokens": None,
                            "weight_bytes": stored_bytes(module)})
            logging.info("%s %s ready in %.1f s", name, target, time.perf_counter() - started)
    for round_ in range(args.rounds):
        for config in configs:
            result = config["generator"].generate(PROMPT, args.tokens, stop_at_eos=False)
            config["steps"].append(result.decode_s / (len(result.tokens) - 1))
            config["tokens"] = config["tokens"] or result.tokens
        logging.info("round %d/%d done", round_ + 1, args.rounds)
    eager = {c["weights"]: c for c in configs if c["target"] == "eager"}
    base = statistics.median(eager["fp32"]["steps"])
    rows = []
    for config in configs:
        step = statistics.median(config["steps"])
        rows.append({"weights": config["weights"], "target": config["target"], "threads": args.threads,
                     "tokens": args.tokens, "tokens_per_s": round(1 / step, 2), "step_ms": round(1e3 * step, 2),
                     "ratio_to_fp32_eager": round(base / step, 2),
                     "same_tokens": config["tokens"] == eager[config["weights"]]["tokens"],
                     "weight_bytes": config["weight_bytes"], "compile_s": config["compile_s"],
                     **config["facts"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="int4 only, 16 tokens, 3 rounds")
    parser.add_argument("--forms", help=f"comma list of {', '.join(FORMS)} (default all; quick int4)")
    parser.add_argument("--tokens", type=int, help="greedy tokens per round (default 64; quick 16)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.forms = (args.forms or ("int4" if args.quick else ",".join(FORMS))).split(",")
    unknown = [f for f in args.forms if f not in FORMS]
    if unknown:
        parser.error(f"unknown form {unknown[0]}; choose from {', '.join(FORMS)}")
    args.tokens = args.tokens or (16 if args.quick else 64)
    args.rounds = args.rounds or (3 if args.quick else 5)
    rows = run(args)
    columns = ["weights", "target", "tokens_per_s", "step_ms", "ratio_to_fp32_eager", "same_tokens", "weight_bytes",
               "compile_s"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
