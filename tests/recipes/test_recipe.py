"""Recipes: YAML in, a checked Recipe out (round trip), and one clear error per kind of mistake, in Python and
on the command line (exit status 2, one line on stderr naming the key)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fxpress.cli import main
from fxpress.errors import FxpressError, RecipeError
from fxpress.recipes import Calibration, Evaluation, Export, Recipe, Tuning, check_model, load_recipe

DOCS = Path(__file__).resolve().parents[2] / "docs" / "recipes"
GOOD = {"pipeline": "fold-constants,dce", "calibration": {"source": "digits", "batches": 2}}


def write(tmp_path: Path, data: dict | str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in DOCS.glob("*.yaml")))
def test_shipped_recipes_load_and_round_trip(name, tmp_path):
    recipe = load_recipe(DOCS / name)
    assert recipe.model and recipe.pipeline
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again == recipe
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_every_key_round_trips(tmp_path):
    recipe = Recipe(pipeline="merge-tokens{r=4},dce", model="vit-mnist",
                    calibration=Calibration("mnist-5k", "test", 3), teacher="vit-mnist", target="llvm",
                    tuning=Tuning(trials=8, dir="tuning"), eval=Evaluation("mnist-5k", 32),
                    export=Export(hf="hf", compiled="compiled"), report="run.html", seed=7)
    loaded = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert loaded == recipe
    assert loaded.to_dict() == recipe.to_dict()


def test_defaults_and_shorthands():
    recipe = Recipe.from_dict({"pipeline": ["fold-constants", "dce"], "calibration": 8})
    assert recipe.pipeline == "fold-constants,dce"
    assert recipe.calibration == Calibration("default", "train", 8)
    assert (recipe.teacher, recipe.target, recipe.eval, recipe.seed) == ("self", "eager", None, 0)
    assert Recipe.from_dict({"pipeline": "dce", "calibration": "shakespeare"}).calibration.source == "shakespeare"
    assert recipe.replace(seed=3).seed == 3 and recipe.seed == 0


# (recipe, the key the error names, fragments it also holds)
BAD = [
    ({**GOOD, "calibraton": {}}, "'calibraton'", ["did you mean 'calibration'?", "allowed: pipeline"]),
    ({**GOOD, "calibration": {"sorce": "digits"}}, "'calibration.sorce'", ["did you mean 'calibration.source'?"]),
    ({**GOOD, "calibration": {"batches": "four"}}, "calibration.batches:", ["'four' (str)", "integer >= 0"]),
    ({**GOOD, "calibration": {"batches": -1}}, "calibration.batches:", ["-1", "integer >= 0"]),
    ({**GOOD, "seed": True}, "seed:", ["True (bool)", "integer"]),
    ({**GOOD, "eval": "accuracy"}, "eval:", ["a mapping with keys source, items"]),
    ({**GOOD, "pipeline": 3}, "pipeline:", ["3 (int)", "pipeline string"]),
    ({"model": "cnn-digits"}, "pipeline:", ["missing"]),
    ({**GOOD, "export": {"compiled": "out"}}, "export.compiled:", ["target is eager"]),
    ({**GOOD, "calibration": {"source": "shakespear"}}, "calibration.source:", ["'shakespear'", "shakespeare",
                                                                                "mnist-5k"]),
    ({**GOOD, "calibration": {"split": "validation"}}, "calibration.split:", ["'validation'", "train, test"]),
    ({**GOOD, "eval": {"source": "text:/no/such/file.txt"}}, "eval.source:", ["does not exist"]),
    ({**GOOD, "pipeline": "fold-constants,fuse-batchnrom"}, "pipeline:", ["did you mean 'fuse-batchnorm'?"]),
    ({**GOOD, "pipeline": "dce{x=1}"}, "pipeline:", ["has no option 'x'"]),
    ({**GOOD, "target": "tpu"}, "target:", ["'tpu'", "llvm", "onnx"]),
    ({**GOOD, "pipeline": "merge-tokens", "target": "onnx"}, "pipeline:", ["cannot lower"]),
    ({**GOOD, "tuning": {"trials": 4}}, "tuning.trials:", ["target is eager"]),
]


@pytest.mark.parametrize("data,key,fragments", BAD, ids=[f"{i}-{b[1].strip(':')}" for i, b in enumerate(BAD)])
def test_bad_recipe_names_the_key(data, key, fragments, tmp_path):
    path = write(tmp_path, data)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    for fragment in (key, *fragments):
        assert fragment in message, message


def test_model_mismatch_names_both():
    recipe = Recipe.from_dict({**GOOD, "model": "vit-mnist"}, where="r.yaml")
    with pytest.raises(RecipeError, match=r"r\.yaml: model: .*'vit-mnist'.*'cnn-digits'"):
        check_model(recipe, "cnn-digits")
    check_model(recipe, "vit-mnist")
    check_model(Recipe.from_dict(GOOD), "anything")  # a recipe without `model` fits every model


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML at line 2, column 8: mapping values are not allowed"):
        load_recipe(write(tmp_path, "pipeline: dce\nseed: a: b\n"))
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    assert issubclass(RecipeError, FxpressError)


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("data,key,fragments", [BAD[0], BAD[2], BAD[9], BAD[12], BAD[14]],
                         ids=["unknown-key", "wrong-type", "dataset", "pipeline", "target"])
def test_cli_bad_recipe_is_one_line(data, key, fragments, tmp_path, capsys):
    path = write(tmp_path, data)
    one_line_error(capsys, ["run", "cnn-digits", "--recipe", str(path)], str(path), key, *fragments)


def test_cli_recipe_arguments(tmp_path, capsys):
    path = str(write(tmp_path, {**GOOD, "model": "vit-mnist"}))
    one_line_error(capsys, ["run", "cnn-digits", "--recipe", path], "model:", "'vit-mnist'", "'cnn-digits'")
    one_line_error(capsys, ["run", "vit-mnist", "--recipe", path, "--pipeline", "dce"], "not both")
    one_line_error(capsys, ["run", "vit-mnist"], "--pipeline", "--recipe")
    one_line_error(capsys, ["run", "vit-mnist", "--recipe", path, "--target", "llvm", "--seed", "3"],
                   "--target, --seed", "the recipe")


def test_cli_rejects_a_bad_recipe_before_importing_torch(tmp_path):
    path = write(tmp_path, {**GOOD, "calibraton": {}})
    code = textwrap.dedent(f"""
        import sys
        from fxpress.cli import main
        assert main(["run", "cnn-digits", "--recipe", {str(path)!r}]) == 2
        assert "torch" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 1 and "unknown key 'calibraton'" in done.stderr
