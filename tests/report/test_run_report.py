"""`fxpress run ... --report FILE`: the page shows each pass's own chart, opened in a real browser."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from report.browser import open_page


def fxpress(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fxpress.cli", "--threads", "1", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.parametrize("model, pipeline, changed, charted, chart_text", [
    ("vit-mnist", "remove-layers{count=1,metric=cosine},merge-tokens{r=4},dce",
     ["remove-layers", "merge-tokens"], ["remove-layers", "merge-tokens"], "block importance"),
    ("bnn-digits", "binarize,xnor-mst,dce", ["binarize", "xnor-mst", "dce"], ["xnor-mst"], "reuse tree depth"),
])
def test_run_report_has_a_panel_and_chart_per_changing_pass(tmp_path, model, pipeline, changed, charted,
                                                            chart_text):
    result = fxpress("run", model, "--pipeline", pipeline, "--eval", "default", "--eval-items", "64",
                     "--report", "out/run.html", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"report: out/run.html" in result.stdout
    page_file = tmp_path / "out" / "run.html"
    with open_page(page_file) as (page, log):
        panels = page.locator("details.diff")
        assert [panels.nth(i).get_attribute("data-pass") for i in range(panels.count())] == changed
        page.locator("button[data-details=open]").click()
        for name in changed:  # a pass's own chart sits in its panel; passes without one have none
            charts = page.locator(f"details.diff[data-pass='{name}'] figure.chart svg")
            assert charts.count() == (1 if name in charted else 0), name
            if name in charted:
                assert charts.first.bounding_box()["height"] > 100
        assert page.locator("#quality tbody tr").count() >= 1  # the --eval metric before and after
        assert "#compiled" not in page.content() and page.locator("#compiled").count() == 0  # eager: nothing compiled
    assert chart_text in page_file.read_text()  # matplotlib keeps each text as a comment beside its glyphs
    assert log.errors == [] and len(log.requests) == 1
