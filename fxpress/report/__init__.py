"""HTML reports: one self-contained page per run or sweep.

`Report` builds a page from tables, matplotlib figures and HTML panels;
`run_report` makes the page of a pipeline run (the pass table, a diff per
pass that changed the graph, charts before/after); `RunRecorder` is the
instrument that records those diffs while the pipeline runs.
"""
from fxpress.report.diff import GraphDiff, ModuleDelta, graph_diff
from fxpress.report.page import Report
from fxpress.report.run import RunRecorder, run_report

__all__ = ["GraphDiff", "ModuleDelta", "Report", "RunRecorder", "graph_diff", "run_report"]
