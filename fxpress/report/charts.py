"""Charts for the report, drawn with matplotlib's object API (no pyplot state, no GUI backend).

Each function returns a `matplotlib.figure.Figure`, or None when there is
nothing to draw.  `PASS_CHARTS` maps a pass name to the chart of its stats.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

BEFORE, AFTER, REMOVED = "#8da0cb", "#fc8d62", "#d62728"
MAX_BARS = 40


def _figure(width: float = 7.5, height: float = 3.2):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def before_after_bars(before: Mapping[str, float], after: Mapping[str, float], unit: str, title: str):
    """Grouped bars per module (graph order), before vs after; None when both are empty."""
    names = list(dict.fromkeys([*before, *after]))
    if not names:
        return None
    if len(names) > MAX_BARS:  # keep the largest; the rest is one bar
        names = sorted(names, key=lambda n: -max(before.get(n, 0), after.get(n, 0)))[:MAX_BARS]
    figure, axes = _figure(max(7.5, 0.28 * len(names) + 2), 3.4)
    xs = range(len(names))
    axes.bar([x - 0.2 for x in xs], [before.get(n, 0) for n in names], 0.4, label="before", color=BEFORE)
    axes.bar([x + 0.2 for x in xs], [after.get(n, 0) for n in names], 0.4, label="after", color=AFTER)
    axes.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    axes.set_ylabel(unit)
    axes.set_title(title)
    axes.legend()
    return figure


def block_scores_chart(stats: Mapping[str, Any]):
    """remove-layers: the importance score of every block, removed ones in red."""
    scores: Mapping[str, float] = stats.get("scores") or {}
    if not scores:
        return None
    removed = set(stats.get("removed") or ())
    names = list(scores)
    figure, axes = _figure(max(7.5, 0.25 * len(names) + 2), 3.2)
    colors = [REMOVED if n in removed else BEFORE for n in names]
    axes.bar(range(len(names)), [scores[n] for n in names], color=colors)
    axes.set_xticks(range(len(names)), [n.rsplit(".", 1)[-1] for n in names], fontsize=7)
    axes.set_xlabel("block")
    axes.set_ylabel(f"importance ({stats.get('metric', 'score')})")
    axes.set_title(f"block importance; removed in red ({len(removed)} of {len(names)})")
    return figure


def tokens_chart(stats: Mapping[str, Any]):
    """merge-tokens: tokens entering attention and the MLP of every block."""
    attention: Sequence[int] = stats.get("tokens_attention") or ()
    mlp: Sequence[int] = stats.get("tokens_mlp") or ()
    if not attention:
        return None
    figure, axes = _figure(6.5, 3.0)
    blocks = range(len(attention))
    axes.step(blocks, attention, where="mid", label="attention", color=BEFORE, marker="o")
    axes.step(blocks, mlp, where="mid", label="MLP", color=AFTER, marker="s")
    axes.set_xticks(list(blocks))
    axes.set_xlabel("block")
    axes.set_ylabel("tokens")
    axes.set_ylim(bottom=0)
    axes.set_title("tokens per block")
    axes.legend()
    return figure


def xnor_chart(stats: Mapping[str, Any]):
    """xnor-mst: per-layer bit-ops dense vs MST, and the reuse tree's depth."""
    layers: Sequence[Mapping[str, Any]] = stats.get("layers") or ()
    if not layers:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 3.2), layout="constrained")
    ops, depth = figure.subplots(1, 2)
    xs = range(len(layers))
    ops.bar([x - 0.2 for x in xs], [l["dense_bitops"] for l in layers], 0.4, label="dense", color=BEFORE)
    ops.bar([x + 0.2 for x in xs], [l["mst_bitops"] for l in layers], 0.4, label="MST reuse", color=AFTER)
    ops.set_title("bit-ops per output position")
    ops.set_xticks(list(xs), [str(l["layer"]).rsplit(".", 1)[-1] for l in layers], fontsize=7)
    ops.legend()
    depth.bar(list(xs), [l["depth"] for l in layers], color=BEFORE)
    depth.set_title("reuse tree depth")
    depth.set_xticks(list(xs), [str(l["layer"]).rsplit(".", 1)[-1] for l in layers], fontsize=7)
    return figure


def metric_chart(rows: Mapping[str, tuple[float | None, float | None]]):
    """Small multiples: each metric (accuracy, perplexity, latency, ...) before vs after."""
    rows = {k: v for k, v in rows.items() if isinstance(v[0], (int, float)) and isinstance(v[1], (int, float))}
    if not rows:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(min(2.6 * len(rows), 10.5), 2.8), layout="constrained")
    axes_list = figure.subplots(1, len(rows), squeeze=False)[0]
    for axes, (name, (before, after)) in zip(axes_list, rows.items()):
        axes.bar([0, 1], [before, after], color=[BEFORE, AFTER])
        axes.set_xticks([0, 1], ["before", "after"])
        axes.set_title(name, fontsize=8)
    return figure


PASS_CHARTS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "remove-layers": block_scores_chart,
    "merge-tokens": tokens_chart,
    "xnor-mst": xnor_chart,
}


def pass_chart(pass_name: str, stats: Mapping[str, Any]):
    """The chart of one pass's stats, or None for passes without one."""
    draw = PASS_CHARTS.get(pass_name)
    return draw(stats) if draw else None
