"""`fxpress generate MODEL --prompt TEXT [--cache POLICY] [--target eager|export|llvm] [--pipeline P]`.

``--pipeline`` compresses the weights first (captured graph, the pipeline as `fxpress run` runs it,
then the weights handed back to the modules generation runs: `fxpress.generation.with_graph_weights`).

Prints the generated text, then one line of numbers: prompt and generated tokens, prefill time,
decode tokens/s, and the cache's stored bytes against a float16 full cache (the ratio); merged layer
pairs and evicted tokens when the policy has them.  ``--json FILE`` writes the same as JSON.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from fxpress.cli.commands import _load
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fxpress.cli.render import console, errors, human
from fxpress.errors import FxpressError
from fxpress.generation import Generator, check_decoder, parse_policy, with_graph_weights


def read_prompt(text: str) -> str:
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise FxpressError(f"--prompt {text}: no such file")
        return path.read_text(encoding="utf-8")
    return text


def compressed_module(model, args):
    """The model's modules with the weights `--pipeline` leaves (see the module doc)."""
    from fxpress.cli.commands import recipe_of
    from fxpress.recipes.run import capture_model, run_passes

    recipe = recipe_of(args, args.pipeline)
    with console.status(f"capturing {model.name} and running {args.pipeline}..."):
        result = run_passes(model, capture_model(model), replace(recipe, target="eager"))
    for report in result.reports:
        console.print(f"{report.pass_text}: {'changed the graph' if report.modified else 'no change'}", markup=False)
    return with_graph_weights(model.module, result.graph)


def cmd_generate(args) -> int:
    policy = parse_policy(args.cache)  # a bad policy fails before the model loads
    if args.max_new_tokens < 1:
        raise FxpressError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompt = read_prompt(args.prompt)
    model = _load(args.model, getattr(args, "task", None))
    check_decoder(model.module, f"fxpress generate {args.model}")
    module = compressed_module(model, args) if args.pipeline else model.module
    generator = Generator(module, model.tokenizer, target=args.target)
    if args.target != "eager":
        with console.status(f"capturing{' and compiling' if args.target != 'export' else ''} the decode step..."):
            generator.decode_fn()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=errors, transient=True) as bar:
        task = bar.add_task("decoding", total=args.max_new_tokens)
        result = generator.generate(prompt, args.max_new_tokens, policy,
                                    progress=lambda done: bar.update(task, completed=done))
    console.print(prompt + (result.text or ""), markup=False, highlight=False, soft_wrap=True)
    stats = result.cache_stats
    extra = ""
    if stats.get("evicted"):
        extra += f"; evicted {stats['evicted']:,} (layer, head, token) vectors"
    if stats.get("pairs"):
        retained = sum(p["retained"] for p in stats["pairs"]) / len(stats["pairs"])
        extra += f"; {len(stats['pairs'])} merged layer pairs, {retained:.1%} retained unmerged"
    console.print(f"[{result.target}] cache {result.policy}: {result.prompt_tokens} prompt + {len(result.tokens)} "
                  f"generated tokens; prefill {result.prefill_s:.2f} s; decode {result.tokens_per_s:.1f} tokens/s; "
                  f"KV {human(result.stored_bytes)}B stored vs {human(result.full_bytes)}B float16 full cache "
                  f"({result.kv_bytes_ratio:.2f}x){extra}", markup=False, highlight=False, soft_wrap=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "prompt": prompt, "text": result.text, "tokens": result.tokens, "policy": result.policy,
            "target": result.target, "prompt_tokens": result.prompt_tokens, "prefill_s": result.prefill_s,
            "tokens_per_s": result.tokens_per_s, "stored_bytes": result.stored_bytes,
            "full_bytes": result.full_bytes, "kv_bytes_ratio": result.kv_bytes_ratio, "cache": stats}, indent=2))
    return 0
