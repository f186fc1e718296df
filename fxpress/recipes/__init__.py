"""Recipes (a YAML file that says how to compress a model) and the one-call API, ``fxpress.compress``.

    recipe = fxpress.load_recipe("docs/recipes/vit-mnist-tokens.yaml")
    done = fxpress.compress("vit-mnist", recipe)       # or a pipeline string, a mapping, a YAML path

Reading a recipe needs no torch (:mod:`fxpress.recipes.recipe`), so the command line checks one before
the slow imports; ``Compressed`` and ``run_recipe`` load on first use.  The function ``compress`` is
``fxpress.compress`` (or ``fxpress.recipes.compress.compress``): ``fxpress.recipes.compress`` is its
module.  docs/recipes.md lists every key.
"""
from __future__ import annotations

import importlib
from typing import Any

from fxpress.recipes.recipe import (Calibration, Evaluation, Export, Recipe, Tuning, check_model, load_recipe,
                                    model_matches)

_LAZY = {"Compressed": "fxpress.recipes.compressed", "run_recipe": "fxpress.recipes.run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        importlib.import_module("fxpress.ops")  # the dialect first, as every public fxpress name does
        importlib.import_module("fxpress.backends")
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fxpress.recipes' has no attribute {name!r}")


__all__ = ["Calibration", "Compressed", "Evaluation", "Export", "Recipe", "Tuning", "check_model", "load_recipe",
           "model_matches", "run_recipe"]
