"""`fxpress demo` writes an HTML report; a real headless Chromium opens it and checks what a user sees."""
from __future__ import annotations

import os
import re
from pathlib import Path

from report.browser import open_page

ARTIFACTS = Path(os.environ.get("FXPRESS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".artifacts"))


def test_demo_reports_before_and_after_and_compiles_both_for_the_host_cpu(demo_run):
    result, folder = demo_run
    assert result.returncode == 0, result.stderr
    for row in ("accuracy", "params", "MACs", "latency ms (eager", "latency ms (llvm"):
        assert row in result.stdout
    errors = re.findall(r"(before|after): compiled for llvm in [\d.]+ s; max abs error vs eager ([\d.e+-]+)",
                        result.stdout)
    assert [label for label, _ in errors] == ["before", "after"]
    assert all(float(error) < 1e-4 for _, error in errors)
    assert "report: fxpress-demo.html" in result.stdout
    assert (folder / "fxpress-demo.html").stat().st_size > 10_000


def test_demo_report_renders_in_a_real_browser(demo_run):
    result, folder = demo_run
    assert result.returncode == 0, result.stderr
    with open_page(folder / "fxpress-demo.html") as (page, log):
        rows = page.locator("#passes tbody tr")
        assert rows.count() == 4
        assert [rows.nth(i).locator("td").nth(1).inner_text().split("{")[0] for i in range(4)] == \
            ["fold-constants", "fuse-batchnorm", "merge-tokens", "dce"]
        assert page.locator("#passes tbody tr.unchanged").count() == 3  # only merge-tokens changed the graph

        panels = page.locator("details.diff")
        assert panels.count() == 1 and panels.first.get_attribute("data-pass") == "merge-tokens"
        module_table = panels.first.locator("table").first
        assert not module_table.is_visible()
        panels.first.locator("summary").first.click()
        assert panels.first.evaluate("d => d.open") and module_table.is_visible()
        assert "blocks.3" in module_table.inner_text()
        page.locator("button[data-details=close]").click()
        assert not panels.first.evaluate("d => d.open")
        page.locator("button[data-details=open]").click()
        assert panels.first.evaluate("d => d.open")

        charts = page.locator("figure.chart svg")
        assert charts.count() >= 4  # tokens per block, MACs and params by block, metrics
        for index in range(charts.count()):
            box = charts.nth(index).bounding_box()
            assert box and box["width"] > 150 and box["height"] > 100
        assert "tokens per block" in panels.first.inner_text() or panels.first.locator("svg").count() == 1
        quality = page.locator("#quality table").inner_text()
        assert "accuracy" in quality and "latency ms (llvm" in quality
        assert page.locator("#compiled tbody tr").count() == 2

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "demo-report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000
    page_url = (folder / "fxpress-demo.html").resolve().as_uri()
    assert log.requests == [page_url], f"the report asked for more than itself: {log.requests}"
    assert log.errors == []
