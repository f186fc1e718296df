"""`fxpress sweep`: grid expansion, its errors, the Pareto front, the best-recipe rule, and a real sweep whose
every point equals a single `fxpress run` of the same settings."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fxpress.cli import build_parser, main
from fxpress.errors import PipelineError
from fxpress.passes import format_pipeline, parse_pipeline
from fxpress.recipes.recipe import Recipe
from fxpress.recipes.sweep import (PointResult, SweepPlan, SweepResult, best_point, expand_grid, pareto_front,
                                   run_sweep)

GRID = "merge-tokens{r=[0,4,8,12]}"
ITEMS = 256


# -- grids -------------------------------------------------------------------------------------------------

def test_one_axis_gives_one_point_per_value():
    points = expand_grid(GRID)
    assert [p.settings for p in points] == [{"merge-tokens.r": r} for r in (0, 4, 8, 12)]
    assert [p.pipeline for p in points] == [f"merge-tokens{{r={r}}}" for r in (0, 4, 8, 12)]
    assert [p.label for p in points] == ["r=0", "r=4", "r=8", "r=12"]


def test_two_axes_give_their_cartesian_product_first_axis_slowest():
    points = expand_grid("fold-constants,merge-tokens{r=[4,8],schedule=[constant,decreasing]},dce")
    assert [(p.settings["merge-tokens.r"], p.settings["merge-tokens.schedule"]) for p in points] == [
        (4, "constant"), (4, "decreasing"), (8, "constant"), (8, "decreasing")]
    assert points[1].pipeline == "fold-constants,merge-tokens{r=4,schedule=decreasing},dce"


def test_list_values_inside_an_axis_are_written_as_in_pipelines():
    """`;` separates a list option's items; brackets inside a value (a glob) stay part of it."""
    points = expand_grid("prune-obs{sparsity=0.5,layers=[blocks.[0-1].*;head,fc1]}")
    assert [p.settings["prune-obs.layers"] for p in points] == [("blocks.[0-1].*", "head"), ("fc1",)]
    assert points[0].pipeline == "prune-obs{sparsity=0.5,layers=blocks.[0-1].*;head}"


def test_the_same_pass_twice_and_the_same_option_name_are_told_apart():
    points = expand_grid("merge-tokens{r=[2,4]},merge-tokens{r=[1]}")
    assert points[0].settings == {"merge-tokens#1.r": 2, "merge-tokens#2.r": 1}
    assert points[0].label == "merge-tokens#1.r=2,merge-tokens#2.r=1"


@pytest.mark.parametrize("grid", [GRID, "merge-tokens{r=[4,8],schedule=[constant,decreasing]},dce",
                                  "prune-obs{layers=[a;b,c],sparsity=[0.25,0.5]}"])
def test_every_point_round_trips_through_the_pipeline_parser(grid):
    for point in expand_grid(grid):
        passes = parse_pipeline(point.pipeline)
        assert parse_pipeline(format_pipeline(passes)) == passes
        for key, value in point.settings.items():
            name, option = key.split(".")
            assert getattr(next(p for p in passes if p.name == name), option) == value


@pytest.mark.parametrize("grid, fragment", [
    ("merge-tokens{r=[]}", "empty grid []"),
    ("merge-tokens{r=8}", "no [..] axis"),
    ("merge-tokens{r=[4,8}", "unbalanced"),
    ("merge-tokens{r=[4,8]", "unbalanced '{'"),
    ("merge-tokens{r=4,8]}", "unbalanced"),
    ("merge-tokens{r=[4,,8]}", "empty value"),
    ("merge-tokens{r=[4,x]}", "sweep point r=x: pass 'merge-tokens': bad value 'x'"),
    ("merge-tokens{r=[1,2,3,4],schedule=[constant,decreasing]}", "8 points, more than the limit of 6"),
])
def test_a_bad_grid_is_one_line_and_exit_status_2_before_any_model_loads(grid, fragment, capsys):
    assert main(["sweep", "vit-mnist", "--pipeline", grid, "--max-points", "6"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    with pytest.raises(PipelineError, match=re.escape(fragment)):
        expand_grid(grid, max_points=6)


def test_run_refuses_a_grid_and_points_to_sweep(capsys):
    assert main(["run", "vit-mnist", "--pipeline", "merge-tokens{r=[4,8]}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "[4,8] is a sweep grid" in lines[0] and "fxpress sweep" in lines[0], lines


# -- choosing ------------------------------------------------------------------------------------------

def test_pareto_front_keeps_the_undominated_points_cheapest_first():
    points = [{"name": "a", "acc": 0.90, "macs": 100}, {"name": "b", "acc": 0.85, "macs": 60},
              {"name": "c", "acc": 0.80, "macs": 70},  # worse and dearer than b
              {"name": "d", "acc": 0.85, "macs": 60},  # equal to b: both stay
              {"name": "e", "acc": 0.90, "macs": 120},  # as good as a, dearer
              {"name": "f", "acc": 0.50, "macs": 10}]
    front = pareto_front(points, {"acc": "max", "macs": "min"})
    assert [p["name"] for p in front] == ["f", "b", "d", "a"]


def test_pareto_front_minimizes_perplexity_when_asked():
    points = [{"ppl": 10.0, "macs": 100}, {"ppl": 12.0, "macs": 50}, {"ppl": 11.0, "macs": 120}]
    assert pareto_front(points, {"ppl": "min", "macs": "min"}) == [points[1], points[0]]


def _result(label: str, metric_name: str, metric: float, macs: int) -> PointResult:
    return PointResult(label=label, pipeline=f"p{{x={label}}}", settings={"p.x": label},
                       metrics={metric_name: metric}, macs=macs, params=1, nodes=1, seconds=0.0)


def _sweep(metric_name: str, baseline: float, points: list[tuple[float, int]]) -> SweepResult:
    made = [_result(str(index), metric_name, value, macs) for index, (value, macs) in enumerate(points)]
    return SweepResult(model="m", grid="p{x=[..]}", metric=metric_name, plan=SweepPlan(model="m"),
                       baseline=_result("baseline", metric_name, baseline, 120), points=made)


def test_best_point_is_the_cheapest_on_the_front_within_tolerance():
    sweep = _sweep("accuracy", 0.95, [(0.95, 100), (0.945, 60), (0.93, 40), (0.94, 70)])
    assert best_point(sweep).label == "1"  # default: at most 1 point of accuracy lost
    assert best_point(sweep, tolerance=0.03).label == "2"
    assert best_point(sweep, tolerance=0.0).label == "0"
    assert best_point(_sweep("accuracy", 0.95, [(0.5, 10)])) is None
    assert best_point(_sweep("accuracy", 0.95, [(0.95, 120), (0.96, 130)])) is None  # no cheaper than the baseline


def test_best_point_allows_a_relative_rise_of_perplexity():
    sweep = _sweep("perplexity", 10.0, [(10.2, 80), (10.6, 50), (10.0, 100)])
    assert best_point(sweep).label == "0"  # 5 %: up to 10.5
    assert best_point(sweep, tolerance=0.1).label == "1"


# -- a real sweep --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """`fxpress sweep vit-mnist --pipeline GRID --workers 2 --eval-items 256 --report R.html`, run once."""
    folder = tmp_path_factory.mktemp("sweep")
    status = main(["sweep", "vit-mnist", "--pipeline", GRID, "--workers", "2", "--eval-items", str(ITEMS),
                   "--report", str(folder / "R.html")])
    assert status == 0
    return folder


def test_sweep_writes_the_report_plots_numbers_and_best_recipe(swept):
    assert {p.name for p in swept.iterdir()} >= {
        "R.html", "R.json", "R.best.yaml", "R.pareto-macs.svg", "R.pareto-macs.png", "R.pareto-latency.svg"}
    page = (swept / "R.html").read_text()
    assert "accuracy against MACs" in page and "<svg" in page and "best recipe" in page
    numbers = json.loads((swept / "R.json").read_text())
    assert [p["label"] for p in numbers["points"]] == ["r=0", "r=4", "r=8", "r=12"]
    assert all(p["latency_ms"] > 0 for p in [numbers["baseline"], *numbers["points"]])
    recipe = yaml.safe_load((swept / "R.best.yaml").read_text())
    assert Recipe.from_dict(recipe).pipeline == next(p["pipeline"] for p in numbers["points"]
                                                     if p["label"] == numbers["best"])
    assert recipe["model"] == "vit-mnist" and recipe["eval"] == {"source": "default", "items": ITEMS}


def test_every_point_equals_a_single_fxpress_run_of_its_settings(swept):
    """`fxpress run vit-mnist --pipeline P --eval default --eval-items 256` in Python, point by point: accuracy,
    MACs and parameters exactly equal.  r=8 runs as a whole single run (its own load and capture); the other
    points go through run's own steps (its context, instruments and pass manager) on one shared capture."""
    from fxpress.cli import commands
    from fxpress.eval import evaluate
    from fxpress.recipes.run import run_passes
    from fxpress.zoo.specs import resolve_model

    numbers = json.loads((swept / "R.json").read_text())
    points = {p["pipeline"]: p for p in numbers["points"]}

    def run_args(pipeline: str):
        return build_parser().parse_args(["run", "vit-mnist", "--pipeline", pipeline, "--eval", "default",
                                          "--eval-items", str(ITEMS)])

    model = resolve_model("vit-mnist")
    captured, compressed, _ = commands.run_pipeline(model, "merge-tokens{r=8}", run_args("merge-tokens{r=8}"))
    runs = {"merge-tokens{r=8}": compressed}
    for pipeline in points.keys() - runs.keys():
        runs[pipeline] = run_passes(model, captured, commands.recipe_of(run_args(pipeline), pipeline)).graph
    for pipeline, graph in runs.items():
        assert evaluate(model, graph, "default", max_items=ITEMS) == points[pipeline]["metrics"]
        assert (graph.macs, graph.num_params) == (points[pipeline]["macs"], points[pipeline]["params"])
    assert evaluate(model, captured, "default", max_items=ITEMS) == numbers["baseline"]["metrics"]
    assert captured.macs == numbers["baseline"]["macs"]
    assert [p["macs"] for p in numbers["points"]] == sorted((p["macs"] for p in numbers["points"]), reverse=True)


def test_in_process_sweep_agrees_with_the_workers(swept):
    numbers = {p["label"]: p for p in json.loads((swept / "R.json").read_text())["points"]}
    sweep = run_sweep(SweepPlan(model="vit-mnist", eval_items=ITEMS), expand_grid("merge-tokens{r=[4,12]}"),
                      workers=1, latency=False)
    for point in sweep.points:
        assert (point.metrics, point.macs) == (numbers[point.label]["metrics"], numbers[point.label]["macs"])
    assert set(sweep.graphs) == {"baseline", "r=4", "r=12"}


def test_the_docs_example_runs():
    page = Path(__file__).resolve().parents[2] / "docs" / "sweep.md"
    (block,) = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    exec(compile(block, str(page), "exec"), {})
