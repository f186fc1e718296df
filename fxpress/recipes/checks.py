"""The checks of a recipe that need fxpress's registries: passes, targets, data sources (imports torch).

Each failure is a RecipeError naming the key: ``r.yaml: pipeline: unknown pass 'fuse-batchnrom' ...``,
``r.yaml: target: unknown target 'tpu'; available: eager, llvm, ...``,
``r.yaml: calibration.source: unknown data source 'shakespear'; ... a dataset: digits, ...``.
"""
from __future__ import annotations

import importlib

from fxpress.errors import FxpressError
from fxpress.recipes.recipe import EAGER, Recipe


def check_recipe(recipe: Recipe) -> None:
    """RecipeError unless the pipeline parses and fits the target, and the sources and split exist."""
    check_pipeline(recipe)
    check_sources(recipe)
    if recipe.tuning.trials and recipe.target == EAGER:
        raise recipe.fail("tuning.trials", f"{recipe.tuning.trials} trials tune a compiled model, and target is "
                                           "eager; set target: llvm or use trials: 0")


def known_targets() -> tuple[str, ...]:
    """``eager`` and every registered compilation target."""
    importlib.import_module("fxpress.ops")  # the dialect first, as every public fxpress name does
    from fxpress.backends import available_targets

    return (EAGER, *available_targets())


def check_pipeline(recipe: Recipe) -> None:
    """The target exists, the pipeline parses, and the target can lower every op its passes insert."""
    targets = known_targets()
    if recipe.target not in targets:
        raise recipe.fail("target", f"unknown target {recipe.target!r}; allowed: {', '.join(targets)}")
    from fxpress.passes import PassManager

    try:
        PassManager(recipe.pipeline, target=None if recipe.target == EAGER else recipe.target)
    except FxpressError as err:
        raise recipe.fail("pipeline", str(err)) from err


def check_sources(recipe: Recipe) -> None:
    """Calibration and evaluation sources parse (files exist, datasets are known); the split exists."""
    from fxpress.eval import parse_source
    from fxpress.zoo.datasets import SPLITS

    checked = [("calibration.source", recipe.calibration.source)]
    if recipe.eval is not None:
        checked.append(("eval.source", recipe.eval.source))
    for key, source in checked:
        try:
            parse_source(source)
        except FxpressError as err:
            raise recipe.fail(key, str(err)) from err
    if recipe.calibration.split not in SPLITS:
        raise recipe.fail("calibration.split", f"{recipe.calibration.split!r} is not a split; allowed: "
                                               f"{', '.join(SPLITS)}")
