"""fxpress.compress: the same graph as `fxpress run --recipe`, plain modules and Hugging Face models in,
plain modules, Hugging Face folders, compiled models and reports out; the caller's model untouched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fxpress
from fxpress.cli import build_parser, main
from fxpress.cli.commands import compress_recipe
from fxpress.errors import FxpressError, RecipeError
from fxpress.recipes import Recipe, load_recipe

DOCS = Path(__file__).resolve().parents[2] / "docs" / "recipes"
VIT_RECIPE = DOCS / "vit-mnist-tokens.yaml"


def assert_same_graph(first: fxpress.Graph, second: fxpress.Graph) -> None:
    """Same code and, name by name, equal tensors."""
    assert first.module.code == second.module.code
    state, other = first.module.state_dict(), second.module.state_dict()
    assert state.keys() == other.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, other[name]), name


def test_cli_recipe_and_compress_give_the_same_graph():
    """`fxpress run vit-mnist --recipe FILE` up to its graph (what it prints: the test below), and compress."""
    cli = compress_recipe(build_parser().parse_args(["run", "vit-mnist", "--recipe", str(VIT_RECIPE)]))
    done = fxpress.compress("vit-mnist", VIT_RECIPE)
    assert_same_graph(cli.graph, done.graph)
    assert done.recipe == load_recipe(VIT_RECIPE)
    assert [r.pass_text for r in done.reports] == [r.pass_text for r in cli.reports]
    assert done.graph.macs < 0.6 * done.before.macs
    (name, (before, after)), = done.metrics.items()
    assert name == "accuracy (mnist-5k test)" and after > 0.9 and before > after - 0.05


def test_cli_recipe_compiles_exports_and_reports(tmp_path, capsys):
    recipe = Recipe.from_dict({"model": "cnn-digits", "pipeline": "fold-constants,fuse-batchnorm,dce",
                               "calibration": {"source": "digits", "batches": 1}, "target": "onnx",
                               "eval": {"source": "digits", "items": 64},
                               "export": {"compiled": str(tmp_path / "compiled")}})
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    report = tmp_path / "run.html"
    assert main(["--threads", "1", "run", "cnn-digits", "--recipe", str(path), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "fuse-batchnorm" in out and "accuracy (digits test)" in out and "compiled for onnx" in out
    assert f"compiled: wrote {tmp_path / 'compiled'}" in out and f"report: wrote {report}" in out
    assert (tmp_path / "compiled" / "manifest.json").is_file() and "fuse-batchnorm" in report.read_text()


def test_a_model_the_recipe_is_not_for_is_refused():
    with pytest.raises(RecipeError, match="model: the recipe is for 'vit-mnist'.*'cnn-digits'"):
        fxpress.compress("cnn-digits", VIT_RECIPE)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def small_net(training: bool) -> nn.Module:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():  # a batch norm with statistics, so folding it changes weights
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.train(training)


@pytest.mark.parametrize("training", [False, True])
def test_plain_module_with_a_pipeline_string(training):
    net = small_net(training)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 1, 8, 8)
    done = fxpress.compress(net, (x,), "fold-constants,fuse-batchnorm,dce",
                            calibration=[(torch.randn(2, 1, 8, 8),) for _ in range(2)])
    assert "batch_norm" in done.before.module.code and "batch_norm" not in done.graph.module.code
    assert done.compiled is None and done.recipe.pipeline == "fold-constants,fuse-batchnorm,dce"
    module = done.to_module()
    assert isinstance(module, nn.Module) and not isinstance(module, fxpress.Graph)
    with torch.no_grad():
        torch.testing.assert_close(module(x), done.graph(x))
        torch.testing.assert_close(done(x), net.eval()(x) if not training else done.before(x))
    net.train(training)
    assert net.training is training  # compress never switched the caller's model
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_lossy_training_pass_leaves_the_model_alone():
    """Distillation (from another teacher) trains the compressed copy; the caller's weights stay as they were."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()  # other weights to learn
    done = fxpress.compress(net, (torch.randn(4, 8),), "distill{steps=3,lr=0.01,tail=0}", calibration=2, seed=1,
                            teacher=teacher)
    assert done.recipe.calibration.batches == 2 and done.recipe.seed == 1
    trained = done.graph.module.state_dict()
    assert any(not torch.equal(trained[name], tensor) for name, tensor in state.items())  # the copy learned
    assert not net.training
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_arguments_override_the_recipe_and_bad_ones_are_refused(tmp_path):
    net = small_net(False)
    x = torch.randn(2, 1, 8, 8)
    recipe = Recipe.from_dict({"pipeline": "fuse-batchnorm", "calibration": 0})
    done = fxpress.compress(net, x, recipe, target="onnx", report=tmp_path / "run.html")
    assert done.recipe.target == "onnx" and done.compiled is not None
    torch.testing.assert_close(done.compiled(x), done.graph(x), rtol=1e-4, atol=1e-5)
    saved = done.save_compiled(tmp_path / "compiled")
    assert json.loads((saved / "manifest.json").read_text())["target"] == "onnx"
    page = done.written["report"].read_text()
    assert "fuse-batchnorm" in page and "<html" in page.lower()
    with pytest.raises(RecipeError, match="target: unknown target 'tpu'"):
        fxpress.compress(net, x, "dce", target="tpu")
    with pytest.raises(RecipeError, match="example_inputs go with an nn.Module"):
        fxpress.compress("cnn-digits", (x,), "dce")
    with pytest.raises(RecipeError, match="needs example_inputs"):
        fxpress.compress(net, None, "dce")
    with pytest.raises(RecipeError, match="calibration is a list of input tuples"):
        fxpress.compress(net, x, "dce", calibration=2.5)
    with pytest.raises(FxpressError, match="was not compiled"):
        fxpress.compress(net, x, {"pipeline": "dce", "calibration": 0}).save_compiled(tmp_path / "none")


def test_hugging_face_model_in_and_out(tmp_path):
    from hf_factories import tiny_model

    from transformers import LlamaForCausalLM

    from fxpress.export.hf import load_hf

    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    recipe = {"pipeline": "remove-layers{count=1,metric=last}", "calibration": 2,
              "export": {"hf": str(tmp_path / "by-recipe")}}
    done = fxpress.compress(model, {"input_ids": ids}, recipe)
    assert done.before.num_params > done.graph.num_params
    for folder in (done.written["hf"], done.to_hf(tmp_path / "hf")):
        assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
        reloaded = load_hf(folder, LlamaForCausalLM)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, done.graph(ids),
                                       rtol=1e-5, atol=1e-5)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_public_names():
    from fxpress.recipes.compress import compress
    from fxpress.recipes.compressed import Compressed

    assert fxpress.compress is compress and fxpress.Compressed is Compressed
    assert fxpress.Recipe is Recipe and fxpress.load_recipe is load_recipe


@pytest.mark.slow
def test_smollm2_depth_recipe_cli_and_compress_agree(tmp_path):
    """The shipped SmolLM2 recipe (its evaluation left out: it does not change the graph) through the command
    line's code, then through fxpress.compress on the model the command line loaded (loaded once)."""
    recipe = load_recipe(DOCS / "smollm2-depth.yaml")
    path = tmp_path / "depth.yaml"
    path.write_text(Recipe.from_dict({**recipe.to_dict(), "eval": None}).to_yaml())
    cli = compress_recipe(build_parser().parse_args(["run", "smollm2", "--recipe", str(path)]))
    done = fxpress.compress(cli.model, path)
    assert_same_graph(cli.graph, done.graph)
    assert done.graph.num_params < 0.9 * done.before.num_params
