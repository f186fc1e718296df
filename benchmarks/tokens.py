"""Token merging on vit-mnist: accuracy, MACs and measured throughput against the unmerged model.

    python benchmarks/tokens.py [--quick] [--json PATH]

For every mode of `merge-tokens` (bipartite = ToMe, transform = Token
Transforming, prune = top-k by CLS attention), schedule and a range of r, the
merged graph is scored on the 1000 held-out MNIST-5k images and timed at
batch 64 (eager, one thread, inference mode) in alternating rounds with the
unmerged graph, in the same run.  `throughput_ratio` is the median over
rounds of unmerged / merged thread CPU time (>1 is faster; the wall-time
ratio is printed beside it); rows marked `*` lie on their mode's
accuracy/throughput frontier.  Writes {"rows": [...]}: mode, schedule, r, tokens_out, tokens_mlp, accuracy,
base_accuracy, macs_ratio, throughput_ratio, throughput_ratio_wall,
latency_ms, base_latency_ms, frontier.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxpress  # noqa: E402
from fxpress.passes import PassContext  # noqa: E402
from fxpress.passes.tokens.merge_tokens import MergeTokens  # noqa: E402
from fxpress.eval.evaluate import classification_accuracy  # noqa: E402
from fxpress.zoo import load_dataset, load_model  # noqa: E402

MODES = ("bipartite", "transform", "prune")
FULL_R = (2, 4, 6, 8, 10, 12, 14, 16, 20)
QUICK_R = (4, 8, 10, 12, 14)
BATCH = 64


def merged_graphs(graph, r_values, schedules):
    """(row, graph) for every mode, schedule and r; the row holds what the pass reported."""
    for schedule in schedules:
        for mode in MODES:
            for r in r_values:
                result = MergeTokens(r=r, mode=mode, schedule=schedule)(graph, PassContext())
                yield {"mode": mode, "schedule": schedule, "r": r, "tokens_out": result.stats["tokens_out"],
                       "tokens_mlp": result.stats["tokens_mlp"],
                       "macs_ratio": round(result.stats.get("macs_ratio", 1.0), 4)}, result.graph


def time_against_base(base, merged, batch: tuple, rounds: int) -> dict:
    """Latency of both graphs in alternating rounds (order flipped each round), one batch each.

    The ratio is the median over rounds of base/merged thread CPU time: on a
    shared machine wall time also counts the time other processes hold the
    core, which swings by 2x from one second to the next; CPU time of the one
    compute thread does not, and pairing adjacent calls cancels slow drift.
    Wall-time ratios are reported beside it.
    """
    cpu: dict[str, list[float]] = {"base": [], "merged": []}
    wall: dict[str, list[float]] = {"base": [], "merged": []}
    with torch.inference_mode():
        base(*batch), merged(*batch)
        for index in range(rounds):
            order = (("base", base), ("merged", merged)) if index % 2 == 0 else (("merged", merged), ("base", base))
            for name, fn in order:
                wall_start, cpu_start = time.perf_counter(), time.thread_time()
                fn(*batch)
                wall[name].append(time.perf_counter() - wall_start)
                cpu[name].append(time.thread_time() - cpu_start)
    paired = [b / m for b, m in zip(cpu["base"], cpu["merged"])]
    paired_wall = [b / m for b, m in zip(wall["base"], wall["merged"])]
    return {"latency_ms": round(1e3 * statistics.median(cpu["merged"]), 3),
            "base_latency_ms": round(1e3 * statistics.median(cpu["base"]), 3),
            "throughput_ratio": round(statistics.median(paired), 3),
            "throughput_ratio_wall": round(statistics.median(paired_wall), 3)}


def mark_frontier(rows: list[dict]) -> None:
    """Within each mode and schedule, a row is on the frontier unless another is better on both axes."""
    for row in rows:
        rivals = [o for o in rows if (o["mode"], o["schedule"]) == (row["mode"], row["schedule"]) and o is not row]
        row["frontier"] = not any(o["accuracy"] >= row["accuracy"] and o["throughput_ratio"] > row["throughput_ratio"]
                                  for o in rivals)


def print_table(rows: list[dict], base_ms: float) -> None:
    print(f"\nvit-mnist, held-out test split, batch {BATCH} eager, 1 thread; unmerged {base_ms:.2f} ms CPU/batch, "
          f"accuracy {rows[0]['base_accuracy']:.3f}")
    header = f"{'mode':10s} {'schedule':10s} {'r':>3s} {'tokens/block (mlp)':22s} {'acc':>6s} {'drop':>6s} " \
             f"{'MACs':>6s} {'thru':>6s} {'(wall)':>7s}"
    print(header + "\n" + "-" * len(header))
    for row in rows:
        drop = 100 * (row["base_accuracy"] - row["accuracy"])
        print(f"{row['mode']:10s} {row['schedule']:10s} {row['r']:3d} {str(row['tokens_mlp']):22s} "
              f"{row['accuracy']:6.3f} {drop:5.1f}p {row['macs_ratio']:6.3f} {row['throughput_ratio']:5.2f}x"
              f" ({row['throughput_ratio_wall']:4.2f}x){' *' if row['frontier'] else ''}")


def print_summary(rows: list[dict]) -> None:
    good = [r for r in rows if r["base_accuracy"] - r["accuracy"] <= 0.010]
    best = max(good, key=lambda r: r["throughput_ratio"], default=None)
    if best:
        print(f"\nfastest within 1.0 point: {best['mode']} {best['schedule']} r={best['r']}: "
              f"{best['throughput_ratio']:.2f}x throughput, accuracy {best['accuracy']:.3f} "
              f"({100 * (best['base_accuracy'] - best['accuracy']):.1f} points drop), MACs {best['macs_ratio']:.3f}")
    by_key = {(r["mode"], r["schedule"], r["r"]): r for r in rows}
    pairs = [(b, by_key[("transform", b["schedule"], b["r"])]) for b in rows
             if b["mode"] == "bipartite" and ("transform", b["schedule"], b["r"]) in by_key]
    for schedule in sorted({b["schedule"] for b, _ in pairs}):
        print(f"transform - bipartite accuracy at equal tokens, {schedule} (points): " +
              " ".join(f"r={b['r']}:{100 * (t['accuracy'] - b['accuracy']):+.1f}"
                       for b, t in pairs if b["schedule"] == schedule))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer r values and timing rounds (< 5 min)")
    parser.add_argument("--json", type=Path, help="write {'rows': [...]} here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    zoo = load_model("vit-mnist")
    test = load_dataset("mnist-5k", "test")
    graph = fxpress.capture(zoo.module, zoo.example_inputs, dynamic=True)
    base_accuracy = classification_accuracy(graph, test)
    r_values, schedules = (QUICK_R, ("constant", "decreasing")) if args.quick else (FULL_R, ("constant", "decreasing"))
    rows, graphs = [], {"base": graph}
    for row, merged in merged_graphs(graph, r_values, schedules):
        row.update(accuracy=classification_accuracy(merged, test), base_accuracy=base_accuracy)
        graphs[len(rows)] = merged
        rows.append(row)
    batch = (test.images[:BATCH],)
    rounds = 30 if args.quick else 40
    for index, row in enumerate(rows):
        row.update(time_against_base(graph, graphs[index], batch, rounds))
    mark_frontier(rows)
    print_table(rows, statistics.median(row["base_latency_ms"] for row in rows))
    print_summary(rows)
    print(f"\n({time.perf_counter() - start:.0f} s, {args.threads} thread(s))")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
