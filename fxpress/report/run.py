"""The report of one pipeline run: the pass table, a diff for each pass that changed the graph,
charts of MACs and params by block, per-pass charts, metrics, latency and compile results.

    recorder = RunRecorder()
    manager = PassManager(pipeline, instruments=[recorder, ...])
    result = manager.run(graph, ctx)
    run_report(model_name=..., description=..., pipeline=pipeline, before=graph, after=result.graph,
               reports=result.reports, recorder=recorder).write("run.html")
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fxpress.ir.graph import Graph
from fxpress.passes.infra.instruments import Instrument
from fxpress.passes.infra.registry import registered_passes
from fxpress.report.charts import before_after_bars, metric_chart, pass_chart
from fxpress.report.diff import GraphDiff, graph_diff, macs_by_block, params_by_block
from fxpress.report.page import Code, Report, details_html, figure_html, pre_html, table_html

PASS_HEADERS = ["#", "pass", "changed", "time s", "nodes", "params", "MACs", "bytes", "max abs error",
                "cosine vs start", "note"]


@dataclass
class RunRecorder(Instrument):
    """Records the semantic diff of every pass that modified the graph (keyed by its position)."""

    diffs: dict[int, GraphDiff] = field(default_factory=dict)
    _index: int = 0

    def before_pipeline(self, graph, ctx) -> None:
        self.diffs, self._index = {}, 0

    def after_pass(self, pass_, before, result, ctx, report) -> None:
        if result.modified:
            self.diffs[self._index] = graph_diff(before, result.graph)
        self._index += 1


def pass_name(pass_text: str) -> str:
    return pass_text.partition("{")[0]


def _delta(before: int, after: int) -> str:
    if before == after:
        return f"{after:,}"
    change = (after - before) / before * 100 if before else 0.0
    return f"{before:,} -> {after:,} ({change:+.1f}%)"


def _note(report: Any) -> str:
    stats = report.stats or {}
    if not report.modified:
        return f"nothing to do: {stats.get('reason', '')}"
    shown = [f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40]
    return ", ".join(shown[:4])


def pass_rows(reports: Sequence[Any]) -> tuple[list[list[Any]], list[str]]:
    """Rows of the per-pass table and their CSS classes (unchanged passes are greyed)."""
    rows, classes = [], []
    for index, report in enumerate(reports):
        b, a = report.before, report.after
        error = report.error or {}
        rows.append([index + 1, Code(report.pass_text), report.modified, round(report.time_s, 3),
                     _delta(b["nodes"], a["nodes"]), _delta(b["params"], a["params"]),
                     _delta(b["macs"], a["macs"]), _delta(b["bytes"], a["bytes"]), error.get("max_abs"),
                     None if "cosine_vs_start" not in error else round(error["cosine_vs_start"], 6), _note(report)])
        classes.append("" if report.modified else "unchanged")
    return rows, classes


def _rewrite_line(pass_text: str) -> str:
    """The pass's one-line statement of its rewrite (its docstring's first line)."""
    cls = registered_passes().get(pass_name(pass_text))
    return cls.summary() if cls else ""


def diff_panel(index: int, report: Any, diff: GraphDiff) -> str:
    """The expandable panel of one pass: module table, the pass's chart, node lists and its stats."""
    b, a = report.before, report.after
    macs = f"MACs {_delta(b['macs'], a['macs'])}" if b["macs"] != a["macs"] else "MACs unchanged"
    summary = f"{index + 1}. {report.pass_text}: {diff.summary()}; {macs}"
    rows = [[m.module, m.added, m.removed, m.rewired, _delta(m.macs_before, m.macs_after),
             _delta(m.params_before, m.params_after), m.weights_changed] for m in diff.modules]
    body = f'<p class="note">{html.escape(_rewrite_line(report.pass_text))}</p>'
    body += table_html(["module", "added", "removed", "rewired", "MACs", "params", "weights changed"], rows) \
        if rows else '<p class="note">no module changed its nodes, MACs, params or weights</p>'
    chart = pass_chart(pass_name(report.pass_text), report.stats or {})
    if chart is not None:
        body += figure_html(chart, "", f"p{index}")
    for kind in ("added", "removed", "rewired"):
        lines = getattr(diff, kind)
        if lines:
            body += details_html(f"{diff.counts[kind]} {kind} nodes", pre_html(lines, diff.counts[kind] - len(lines)),
                                 css="nodes")
    stats = json.dumps(report.stats, indent=1, default=str)
    body += details_html("stats", f"<pre>{html.escape(stats[:20000])}</pre>", css="stats")
    return details_html(summary, body, anchor=f"diff-{index + 1}", data={"pass": pass_name(report.pass_text)})


def run_report(*, model_name: str, description: str, pipeline: str, before: Graph, after: Graph,
               reports: Sequence[Any], recorder: RunRecorder | None = None,
               metrics: Mapping[str, tuple[Any, Any]] | None = None,
               latency: Mapping[str, tuple[Any, Any]] | None = None,
               compile_info: Sequence[Mapping[str, Any]] | None = None) -> Report:
    """The report of one run (sections left out when their data is not given)."""
    report = Report(f"fxpress: {model_name}", subtitle=description)
    report.add_html("model and pipeline", _overview(model_name, pipeline, before, after), anchor="overview")
    rows, classes = pass_rows(reports)
    report.add_html("passes", table_html(PASS_HEADERS, rows, classes), anchor="passes")
    if recorder is not None:
        panels = [diff_panel(i, r, recorder.diffs[i]) for i, r in enumerate(reports) if i in recorder.diffs]
        toolbar = ('<p class="toolbar"><button data-details="open">expand all</button>'
                   '<button data-details="close">collapse all</button></p>')
        body = toolbar + "".join(panels) if panels else '<p class="note">no pass changed the graph</p>'
        report.add_html("what each pass changed", body, anchor="diffs")
    _by_block(report, before, after)
    if metrics or latency:
        _quality(report, dict(metrics or {}), dict(latency or {}))
    if compile_info:
        keys = list(dict.fromkeys(k for row in compile_info for k in row))
        report.add_table("compiled", keys, [[row.get(k) for k in keys] for row in compile_info], anchor="compiled")
    return report


def _overview(model_name: str, pipeline: str, before: Graph, after: Graph) -> str:
    figures = [(name, before.figures()[name], after.figures()[name]) for name in ("params", "macs", "bytes", "nodes")]
    rows = [[name, b, a, round(a / b, 4) if b else None] for name, b, a in figures]
    return (f"<p>model <b>{html.escape(model_name)}</b>; pipeline <code>{html.escape(pipeline)}</code></p>"
            + table_html(["", "before", "after", "after / before"], rows))


def _by_block(report: Report, before: Graph, after: Graph) -> None:
    charts = [("MACs by block", before_after_bars(macs_by_block(before), macs_by_block(after), "MACs",
                                                  "MACs by block, before vs after")),
              ("params by block", before_after_bars(params_by_block(before), params_by_block(after), "params",
                                                    "parameters by block, before vs after"))]
    body = "".join(figure_html(chart, "", f"b{i}") for i, (_, chart) in enumerate(charts) if chart is not None)
    if body:
        report.add_html("MACs and params by block", body, anchor="by-block")


def _quality(report: Report, metrics: dict, latency: dict) -> None:
    rows = []
    for name, (b, a) in {**metrics, **latency}.items():
        ratio = round(a / b, 4) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        rows.append([name, b, a, ratio])
    body = table_html(["", "before", "after", "after / before"], rows)
    chart = metric_chart({**metrics, **latency})
    if chart is not None:
        body += figure_html(chart, "", "q")
    report.add_html("accuracy and latency", body, anchor="quality")
