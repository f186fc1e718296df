"""KV-cache policies on SmolLM2: bytes against perplexity, long-range copy and decode speed, one run.

    python benchmarks/kv.py --quick --json /tmp/kv.json      # 4 samples per source, 512-token contexts
    python benchmarks/kv.py --json /tmp/kv.json              # 8 samples, 1024-token contexts

(a) Each sample's context (held-out Shakespeare or pydoc text) is prefilled once; each policy then
compresses that context's cache and the continuation is scored through it, teacher-forced at its true
positions.  (c) The copy test: a passage, filler text, then the passage's first tokens; the rest of
the passage is the continuation, and copy_acc is the fraction of its tokens the model predicts
exactly (attention must reach back past the filler).  (b) Greedy decoding token by token through
each compressed cache (eager), and for the full cache and the composed policies also through the
TVM-compiled decode step: tokens/s and whether the compiled tokens equal the eager ones.

Rows: policy, source, kv_bytes_ratio (float16 full cache bytes / stored bytes of the compressed
context), ppl, ppl_ratio with its paired-bootstrap 95% interval over samples, copy_acc,
copy_ratio (to the full cache's), tokens_per_s (eager, and compiled where run), same_tokens.
SmolLM2's weights were 4-bit (GGUF Q4_1); its cache is float as for any model.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from fxpress.eval.sources import load_text
from fxpress.eval.stats import paired_bootstrap
from fxpress.generation import Generator
from fxpress.zoo import load_model

SOURCES = {"shakespeare": "shakespeare", "pydoc": "pydoc-topics"}
ROTATED_K4V2 = "quant{kbits=4,vbits=2,group=64,kgroup=64,window=0,rotate=true}"
COMPOSED = "snapkv{keep=0.85,window=16,kernel=63}+" + ROTATED_K4V2
POLICIES = [
    "full",
    "minicache",                                   # MiniCache to the letter: S = L/2, t = 0.6, gamma = 0.05
    "minicache{gamma=0.3}",                        # more tokens retained unmerged
    "merge-values",                                # values only
    "quant{bits=8}",
    "quant{bits=4}",                               # KIVI-4: group 32, float16 window of 32
    "quant{bits=2}",                               # KIVI-2
    "quant{bits=2,group=64,kgroup=64,window=0}",
    "quant{bits=2,group=64,kgroup=64,window=0,rotate=true}",
    ROTATED_K4V2,
    "snapkv{keep=0.75}",
    "snapkv{keep=0.5}",
    "snapkv{keep=0.2}",
    "streaming{sinks=4,window=200}",
    "minicache+quant{bits=4}",
    "snapkv{keep=0.85,window=16}+" + ROTATED_K4V2,            # SnapKV's pooling (7 tokens)
    COMPOSED,                                                 # pooling over 63 tokens keeps spans whole
    "snapkv{keep=0.8,window=16,kernel=63}+" + ROTATED_K4V2,
]
COMPILED = ["full", COMPOSED]
COPY_PASSAGE, COPY_CUE = 64, 8


def token_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"][0]


def samples(ids: torch.Tensor, count: int, context: int, continuation: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` non-overlapping (context, continuation) windows spread evenly over `ids`."""
    span = context + continuation
    if ids.numel() < span * count:
        count = max(1, ids.numel() // span)
    stride = (ids.numel() - span) // max(count - 1, 1)
    return [(ids[i * stride:i * stride + context], ids[i * stride + context:i * stride + span]) for i in range(count)]


def copy_samples(ids: torch.Tensor, count: int, context: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Passage + filler + cue -> the rest of the passage; passage and filler from distant places."""
    filler_len = context - COPY_PASSAGE - COPY_CUE
    out = []
    stride = (ids.numel() - COPY_PASSAGE - filler_len) // max(count, 1)
    for i in range(count):
        passage = ids[i * stride:i * stride + COPY_PASSAGE]
        start = (i * stride + ids.numel() // 2) % (ids.numel() - filler_len)
        filler = ids[start:start + filler_len]
        out.append((torch.cat([passage, filler, passage[:COPY_CUE]]), passage[COPY_CUE:]))
    return out


def score_rows(gen: Generator, policies: list[str], source: str, data, kind: str, observe: int) -> dict:
    """Per policy: per-sample mean nll, exact-match fractions, byte ratios."""
    per: dict[str, dict[str, list]] = {p: {"nll": [], "match": [], "ratio": [], "stats": []} for p in policies}
    for index, (context, continuation) in enumerate(data):
        prefilled = gen.prefill(context, observe=observe)
        for policy in policies:
            result = gen.score(prefilled, continuation, policy)
            per[policy]["nll"].append(result.nll.mean().item())
            per[policy]["match"].append((result.predictions == continuation).float().mean().item())
            per[policy]["ratio"].append(result.kv_bytes_ratio)
            per[policy]["stats"].append(result.cache_stats)
        logging.info("%s %s sample %d/%d", source, kind, index + 1, len(data))
    return per


def decode_rows(model, tokenizer, policies: list[str], prompt: torch.Tensor, tokens: int, compiled: list[str],
                target: str) -> dict:
    eager = Generator(model, tokenizer)
    out = {}
    for policy in policies:
        eager.generate(prompt[:64], 2, policy)  # warm up
        result = eager.generate(prompt, tokens, policy, stop_at_eos=False)
        out[policy] = {"tokens_per_s": result.tokens_per_s, "tokens": result.tokens}
    if compiled:
        start = time.perf_counter()
        tvm = Generator(model, tokenizer, target=target)
        tvm.decode_fn()
        logging.info("compiled the decode step for %s in %.1f s", target, time.perf_counter() - start)
        for policy in compiled:
            result = tvm.generate(prompt, tokens, policy, stop_at_eos=False)
            out[policy]["compiled_tokens_per_s"] = result.tokens_per_s
            out[policy]["same_tokens"] = result.tokens == out[policy]["tokens"]
            out[policy]["cache_in_graph"] = result.cache_in_graph
    return out


def plot(rows: list[dict], path: Path) -> None:
    """KV bytes ratio against perplexity ratio, one panel per source; colour: copy accuracy vs full."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({row["source"] for row in rows})
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4.5), squeeze=False)
    for ax, source in zip(axes[0], sources):
        mine = [row for row in rows if row["source"] == source]
        points = ax.scatter([r["kv_bytes_ratio"] for r in mine], [r["ppl_ratio"] for r in mine],
                            c=[r["copy_ratio"] for r in mine], cmap="viridis", vmin=0.3, vmax=1.0, s=40)
        for row in mine:
            label = row["policy"].replace("quant{kbits=4,vbits=2,group=64,kgroup=64,window=0,rotate=true}", "k4v2rot")
            ax.annotate(label, (row["kv_bytes_ratio"], row["ppl_ratio"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(1.05, color="grey", lw=0.8, ls="--")
        ax.axvline(5.0, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("KV bytes ratio (float16 full cache / stored)")
        ax.set_ylabel("perplexity ratio to the full cache")
        ax.set_title(f"SmolLM2, {source}")
        fig.colorbar(points, ax=ax, label="copy accuracy / full cache's")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def decode_table(args, zoo, policies: list[str], context: int, decode_tokens: int) -> None:
    ids = token_ids(zoo.tokenizer, load_text(SOURCES["shakespeare"], "test"))
    prompt = samples(ids, 1, context, args.continuation)[0][0]
    target = None if args.target == "none" else args.target
    decode = decode_rows(zoo.module, zoo.tokenizer, policies, prompt, decode_tokens,
                         [p for p in COMPILED if p in policies] if target else [], target)
    rows = [{"policy": p, "context": context, "tokens": decode_tokens, "tokens_per_s": round(d["tokens_per_s"], 2),
             "compiled_tokens_per_s": round(d["compiled_tokens_per_s"], 2) if "compiled_tokens_per_s" in d else None,
             "same_tokens": d.get("same_tokens"), "cache_in_graph": d.get("cache_in_graph"),
             "greedy_agree": round(float(np.mean([a == b for a, b in zip(d["tokens"], decode["full"]["tokens"])])), 3)}
            for p, d in decode.items()]
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 samples, 512-token contexts, 16 decoded tokens")
    parser.add_argument("--samples", type=int, help="samples per source (default 8; quick 4)")
    parser.add_argument("--context", type=int, help="context tokens (default 1024; quick 512)")
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, help="greedy tokens decoded per policy (default 64; quick 16)")
    parser.add_argument("--policies", help="';'-separated policies (default: the built-in list)")
    parser.add_argument("--target", default="llvm", help="compiled decode target; 'none' skips it")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--plot", type=Path, help="draw bytes ratio vs perplexity ratio (PNG) here")
    parser.add_argument("--plot-from", type=Path, metavar="JSON", help="only draw --plot from a saved --json")
    parser.add_argument("--decode-only", action="store_true",
                        help="only (b): decode through each policy, eager and compiled (rows: policy, tokens/s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.plot_from:
        plot(json.loads(args.plot_from.read_text()), args.plot or args.plot_from.with_suffix(".png"))
        return
    torch.set_num_threads(1)
    count = args.samples or (4 if args.quick else 8)
    context = args.context or (512 if args.quick else 1024)
    decode_tokens = args.decode_tokens or (16 if args.quick else 64)
    policies = args.policies.split(";") if args.policies else POLICIES
    if "full" not in policies:
        policies = ["full", *policies]
    zoo = load_model("smollm2")
    if args.decode_only:
        return decode_table(args, zoo, policies, context, decode_tokens)
    gen = Generator(zoo.module, zoo.tokenizer)
    observe = max(gen.policy(p).observe for p in policies)
    rows = []
    first_context = None
    for label, dataset in SOURCES.items():
        ids = token_ids(zoo.tokenizer, load_text(dataset, "test"))
        text = samples(ids, count, context, args.continuation)
        first_context = first_context if first_context is not None else text[0][0]
        lm = score_rows(gen, policies, label, text, "continuation", observe)
        copy = score_rows(gen, policies, label, copy_samples(ids, count, context), "copy", observe)
        for policy in policies:
            diff = paired_bootstrap(lm[policy]["nll"], lm["full"]["nll"])
            ppl = math.exp(float(np.mean(lm[policy]["nll"])))
            copy_acc = float(np.mean(copy[policy]["match"]))
            full_copy = float(np.mean(copy["full"]["match"]))
            pairs = lm[policy]["stats"][0]["pairs"]
            rows.append({
                "policy": policy, "source": label, "samples": len(text), "context": context,
                "kv_bytes_ratio": round(float(np.mean(lm[policy]["ratio"])), 3),
                "ppl": round(ppl, 3), "ppl_ratio": round(math.exp(diff.estimate), 4),
                "ppl_ratio_ci": [round(math.exp(diff.low), 4), round(math.exp(diff.high), 4)],
                "copy_acc": round(copy_acc, 4), "copy_ratio": round(copy_acc / max(full_copy, 1e-9), 4),
                "merged_retained": round(float(np.mean([p["retained"] for p in pairs])), 4) if pairs else None,
                "merged_key_distance": round(float(np.mean([p["key_distance"] for p in pairs])), 4) if pairs else None,
            })
    target = None if args.target == "none" else args.target
    decode = decode_rows(zoo.module, zoo.tokenizer, policies, first_context, decode_tokens,
                         [p for p in COMPILED if p in policies] if target else [], target)
    for row in rows:
        d = decode[row["policy"]]
        row["tokens_per_s"] = round(d["tokens_per_s"], 2)
        row["compiled_tokens_per_s"] = round(d["compiled_tokens_per_s"], 2) if "compiled_tokens_per_s" in d else None
        row["same_tokens"] = d.get("same_tokens")
        row["greedy_agree"] = round(float(np.mean([a == b for a, b in zip(d["tokens"], decode["full"]["tokens"])])), 3)
    columns = ["policy", "source", "kv_bytes_ratio", "ppl", "ppl_ratio", "ppl_ratio_ci", "copy_acc", "copy_ratio",
               "tokens_per_s", "compiled_tokens_per_s", "same_tokens", "greedy_agree"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
