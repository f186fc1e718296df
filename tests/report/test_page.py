"""The HTML page: escaped text, inline SVG charts with distinct ids, nothing fetched from outside."""
from __future__ import annotations

import re

from matplotlib.figure import Figure

from fxpress.report import Report
from fxpress.report.charts import block_scores_chart, pass_chart, tokens_chart, xnor_chart


def _figure():
    figure = Figure(figsize=(3, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    return figure


def test_text_is_escaped_and_the_page_is_self_contained(tmp_path):
    report = Report("<script>alert(1)</script>", subtitle="a & b")
    report.add_table("t <1>", ["name", "value"], [["<b>x</b>", 3], ["y", 0.5]], note="n < m")
    report.add_figure("one", _figure())
    report.add_figure("two", _figure())
    text = report.write(tmp_path / "r.html").read_text()
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;b&gt;x&lt;/b&gt;" in text and '<td class="num">3</td>' in text
    assert text.count("<svg") == 2 and "<?xml" not in text and "<!DOCTYPE svg" not in text
    urls = set(re.findall(r'(?:href|src)="([^"#][^"]*)"', text))
    assert urls == set(), f"the page refers to outside files: {urls}"
    ids = re.findall(r'id="([^"]+)"', text)
    assert len(ids) == len(set(ids)), "two charts share an SVG id"


def test_pass_charts_draw_from_the_pass_stats():
    scores = {"blocks.0": 0.5, "blocks.1": 0.1, "blocks.2": 0.3}
    figure = block_scores_chart({"scores": scores, "removed": ["blocks.1"], "metric": "cosine"})
    bars = figure.axes[0].patches
    assert [round(b.get_height(), 3) for b in bars] == [0.5, 0.1, 0.3]
    assert [b.get_facecolor() for b in bars].count(bars[1].get_facecolor()) == 1  # the removed one stands out
    figure = tokens_chart({"tokens_attention": [50, 42, 34], "tokens_mlp": [42, 34, 26]})
    assert list(figure.axes[0].lines[0].get_ydata()) == [50, 42, 34]
    layers = [{"layer": "conv1", "dense_bitops": 100, "mst_bitops": 40, "depth": 3}]
    assert [b.get_height() for b in xnor_chart({"layers": layers}).axes[0].patches] == [100, 40]
    assert pass_chart("dce", {"removed_nodes": 3}) is None
    assert pass_chart("remove-layers", {"removed": []}) is None
