"""gdnet-lite: the depth scene and its split, the shipped fixture against bicubic upsampling on the held-out
strip, evaluation through fxpress.eval, and exact capture."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import fxpress
from fxpress.errors import DataError
from fxpress.eval import calibration_batches, depth_rmse, describe_data, evaluate, metric_goal
from fxpress.eval.depth import bicubic_baseline
from fxpress.passes import PassContext, PassManager
from fxpress.zoo import gdnet, list_datasets, load_dataset
from fxpress.zoo.fixture_io import fixture_paths

torch.set_num_threads(1)
LOW = gdnet.PATCH // gdnet.SCALE


@pytest.fixture(scope="module")
def model(zoo_model):
    return zoo_model("gdnet-lite")


@pytest.fixture(scope="module")
def scores(model):
    return evaluate(model, model.module)


def test_model_loads_with_fixed_shape_tile_inputs(model):
    assert model.task == "depth-sr" and model.dataset == "motorcycle-depth" and not model.module.training
    rgb, lr = model.example_inputs
    assert rgb.shape == (2, 3, gdnet.PATCH, gdnet.PATCH) and lr.shape == (2, 1, LOW, LOW)
    assert model.dynamic_dims == {0: {0: "batch"}, 1: {0: "batch"}}
    with torch.no_grad():
        out = model.module(rgb, lr)
    assert out.shape == (2, 1, gdnet.PATCH, gdnet.PATCH) and out.dtype == torch.float32
    assert 10_000 <= model.num_params <= 300_000 and model.meta["params"] == model.num_params
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.module.modules())
    assert "reconstruct" in gdnet.__doc__ and "\n" not in model.description
    assert sum(p.stat().st_size for p in fixture_paths("gdnet-lite")) < 2_000_000


def test_fixture_beats_bicubic_on_the_held_out_strip(model, scores):
    assert list(scores) == ["rmse_mm", "bicubic_rmse_mm"]
    assert scores["rmse_mm"] <= 0.95 * scores["bicubic_rmse_mm"]
    for name, recorded in model.metrics.items():
        assert scores[name] == pytest.approx(recorded, abs=0.05)
    assert model.meta["command"] == "python scripts/train_gdnet_lite.py"


def test_depth_comes_from_disparity_and_calibration():
    depth, valid = gdnet.disparity_to_depth(np.array([[0.0, 10.0, np.inf, np.nan]], dtype=np.float32))
    expected = gdnet.FOCAL_PX * gdnet.BASELINE_MM / (np.array([0.0, 10.0]) + gdnet.DOFFS_PX)
    np.testing.assert_allclose(depth[0, :2], expected, rtol=1e-6)
    assert valid.tolist() == [[True, True, False, False]]
    scene = gdnet.load_scene()
    assert scene.rgb.shape == (3, gdnet.HEIGHT, gdnet.WIDTH) and 0 <= scene.rgb.min() and scene.rgb.max() <= 1
    depths = scene.depth[scene.valid]
    assert 2000 < depths.min() and depths.max() < 5100  # the garage scene lies 2.1 m to 5 m from the camera
    assert 0.85 < scene.valid.float().mean() < 0.95


def test_split_is_disjoint_and_scores_each_held_out_pixel_once():
    start, stop = gdnet.HELD_OUT_COLUMNS
    train, test = load_dataset("motorcycle-depth", "train"), load_dataset("motorcycle-depth", "test")
    assert "motorcycle-depth" in list_datasets() and len(test) == 24 and len(train) > len(test)
    assert all(start <= col and col + gdnet.PATCH <= stop for _, col in test.origins.tolist())
    crops = gdnet.random_train_origins(2000, torch.Generator().manual_seed(0))
    for _, col in train.origins.tolist() + crops:
        assert col + gdnet.PATCH <= start - gdnet.GAP or col >= stop + gdnet.GAP
    assert {col < start for _, col in crops} == {True, False}  # both sides of the strip are used
    scored = torch.zeros(1, gdnet.HEIGHT, gdnet.WIDTH, dtype=torch.int64)
    for (row, col), valid in zip(test.origins.tolist(), test.valid):
        scored[:, row:row + gdnet.PATCH, col:col + gdnet.PATCH] += valid
    strip = gdnet.load_scene().valid[:, :, start:stop]
    assert scored.max() == 1 and torch.equal(scored[:, :, start:stop].bool(), strip) and scored.sum() == strip.sum()


def test_degradation_is_seeded_quantized_and_noisy():
    first, second = load_dataset("motorcycle-depth", "test"), gdnet.load_depth_dataset("test")
    assert torch.equal(first.lr, second.lr)
    assert torch.equal(first.lr, torch.round(first.lr / gdnet.QUANT_STEP_MM) * gdnet.QUANT_STEP_MM)
    clean = gdnet.area_downsample(first.depth)
    noise = (first.lr - clean).std()
    assert 0.5 * gdnet.NOISE_MM < noise < 2 * gdnet.NOISE_MM
    a = gdnet.random_train_crops(4, torch.Generator().manual_seed(1))
    b = gdnet.random_train_crops(4, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_evaluation_through_the_public_api(model, scores):
    assert metric_goal("rmse_mm") == "min" and metric_goal("accuracy") == "max"
    assert describe_data(model) == "motorcycle-depth test"
    assert scores["bicubic_rmse_mm"] == pytest.approx(depth_rmse(bicubic_baseline, "motorcycle-depth"))
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims)
    assert evaluate(model, graph, "motorcycle-depth", batch_size=5) == pytest.approx(scores, abs=1e-3)
    static = fxpress.capture(model.module, model.example_inputs)  # batch 2: the last batch is padded
    assert evaluate(model, static, max_items=5) == pytest.approx(evaluate(model, model.module, max_items=5),
                                                                 abs=1e-3)
    with pytest.raises(DataError, match="depth dataset"):
        evaluate(model, model.module, "digits")
    batches = calibration_batches(model, count=3)
    assert len(batches) == 3 and batches[0][0].shape == (8, 3, 64, 64) and batches[0][1].shape == (8, 1, 16, 16)
    train_inputs = load_dataset("motorcycle-depth", "train").lr
    assert torch.equal(torch.cat([b[1] for b in batches]), train_inputs[:24])


def test_capture_is_exact_and_batchnorm_folds(model):
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims)
    assert torch.equal(graph(*model.example_inputs), model.module(*model.example_inputs))
    tiles = load_dataset("motorcycle-depth", "test")
    other = (tiles.rgb[:6], tiles.lr[:6])
    with torch.no_grad():
        assert torch.equal(graph(*other), model.module(*other))
    assert graph.num_params == model.num_params and graph.macs == 2 * model.meta["macs_per_tile"]
    fused = PassManager("fuse-batchnorm").run(graph, PassContext()).graph
    assert not any("batch_norm" in str(n.target) for n in fused.fx.nodes)
    with torch.no_grad():
        torch.testing.assert_close(fused(*other), model.module(*other), rtol=1e-4, atol=0.05)


def test_doc_example_runs(monkeypatch):
    page = Path(__file__).resolve().parents[2] / "docs" / "gdnet.md"
    (block,) = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    module = types.ModuleType("gdnet_doc_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(block, str(page), "exec"), module.__dict__)
    assert module.depth.shape == (2, 1, 64, 64)
