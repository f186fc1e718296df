"""`fxpress.compress`: a model and a recipe (or a pipeline) in, a compressed model out, in one call.

    import fxpress
    done = fxpress.compress("vit-mnist", "docs/recipes/vit-mnist-tokens.yaml")
    done = fxpress.compress(module, (x,), "fold-constants,dce", calibration=[(x1,), (x2,)])
    done.graph, done.reports, done.to_module(), done.to_hf("out/"), done.write_report("run.html")

The command line's ``fxpress run MODEL --recipe r.yaml`` calls the same function, so both give the same
graph.  The caller's model is never changed: capture reads it, passes rewrite copies.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Mapping, Sequence

import torch

from fxpress.errors import RecipeError
from fxpress.ir import Graph
from fxpress.passes import Instrument
from fxpress.passes.infra.base import Progress
from fxpress.recipes.compressed import Compressed
from fxpress.recipes.recipe import Calibration, Recipe, load_recipe, model_matches
from fxpress.recipes.run import run_recipe
from fxpress.zoo import ZooModel
from fxpress.zoo.hf_wrap import is_pretrained, wrap_pretrained
from fxpress.zoo.specs import resolve_model

log = logging.getLogger(__name__)

RECIPE_SUFFIXES = (".yaml", ".yml")


def compress(model: torch.nn.Module | ZooModel | str, example_inputs: Any = None,
             recipe_or_pipeline: Recipe | str | os.PathLike | Mapping | None = None, *,
             calibration: Sequence[tuple] | int | str | None = None, target: str | None = None,
             teacher: torch.nn.Module | Graph | str | None = None, seed: int | None = None,
             report: str | os.PathLike | None = None, progress: Progress | None = None,
             instruments: Sequence[Instrument] = ()) -> Compressed:
    """Capture `model`, run the recipe's pipeline on it, and evaluate, compile, export as the recipe says.

    model: an nn.Module (with `example_inputs`: a tensor, a tuple, or a Hugging Face model's keyword dict;
    Hugging Face models are wrapped for capture), a ZooModel, or a MODEL spec as on the command line
    (a zoo name, a Hugging Face folder, a .gguf file).  For a ZooModel or a spec the recipe may come
    second: ``compress("vit-mnist", "r.yaml")``.
    recipe_or_pipeline: a Recipe, a YAML file, a mapping with the recipe's keys, or a pipeline string.
    The keyword arguments override the recipe: calibration (a list of input tuples, a number of batches,
    or a source such as ``shakespeare``), target, teacher (a module, a Graph or a MODEL spec), seed,
    report (an HTML path).  progress: a Progress for long passes; instruments: extra pass instruments.
    """
    if recipe_or_pipeline is None and not isinstance(model, torch.nn.Module) and _is_recipe(example_inputs):
        example_inputs, recipe_or_pipeline = None, example_inputs
    if recipe_or_pipeline is None:
        raise RecipeError("compress needs a recipe or a pipeline: compress(model, example_inputs, "
                          "\"fold-constants,dce\") or compress(\"vit-mnist\", \"recipe.yaml\")")
    recipe = _with_arguments(as_recipe(recipe_or_pipeline), calibration, target, teacher, seed, report)
    recipe.check()
    zoo = as_zoo_model(model, example_inputs, recipe)
    batches = _batches(calibration)
    return run_recipe(zoo, recipe, batches=batches, progress=progress, instruments=instruments,
                      teacher=None if teacher is None or isinstance(teacher, str) else teacher)


def as_recipe(value: Recipe | str | os.PathLike | Mapping) -> Recipe:
    """A Recipe from a Recipe, a YAML path, a mapping or a pipeline string."""
    if isinstance(value, Recipe):
        return value
    if isinstance(value, Mapping):
        return Recipe.from_dict(dict(value), where="recipe")
    if isinstance(value, os.PathLike) or (isinstance(value, str) and (value.strip().endswith(RECIPE_SUFFIXES)
                                                                      or os.path.isfile(value))):
        return load_recipe(value, deep=False)
    if isinstance(value, str):
        return Recipe.from_dict({"pipeline": value}, where="pipeline")
    raise RecipeError(f"a recipe is a Recipe, a YAML file, a mapping or a pipeline string, "
                      f"not {type(value).__name__}")


def as_zoo_model(model: torch.nn.Module | ZooModel | str, example_inputs: Any, recipe: Recipe) -> ZooModel:
    """The model as fxpress calls it; a spec must agree with the recipe's `model` key."""
    if example_inputs is not None and not isinstance(model, torch.nn.Module):
        raise RecipeError(f"compress: example_inputs go with an nn.Module; a {type(model).__name__} model brings "
                          "its own")
    if isinstance(model, ZooModel):
        if recipe.model and not model_matches(recipe.model, model.name, model.meta.get("source")):
            raise recipe.fail("model", f"the recipe is for {recipe.model!r}, and the model given is "
                                       f"{model.name!r}")
        return model
    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        if recipe.model and not model_matches(recipe.model, spec):
            raise recipe.fail("model", f"the recipe is for {recipe.model!r}, and the model given is {spec!r}")
        return resolve_model(spec)
    if isinstance(model, torch.nn.Module):
        return _module_model(model, example_inputs)
    raise RecipeError(f"compress: model is an nn.Module, a ZooModel or a MODEL spec, not {type(model).__name__}")


def _module_model(module: torch.nn.Module, example_inputs: Any) -> ZooModel:
    """A ZooModel around the caller's module (an eval-mode copy when it is training: never switched)."""
    if example_inputs is None:
        raise RecipeError(f"compress: an nn.Module ({type(module).__name__}) needs example_inputs, "
                          "e.g. compress(model, (x,), pipeline)")
    if module.training:
        log.info("compress: %s is in training mode; capturing an eval-mode copy", type(module).__name__)
        module = copy.deepcopy(module).eval()
    name = type(module).__name__
    if is_pretrained(module):
        wrapped = wrap_pretrained(module, example_inputs)
        return ZooModel(name=name, module=wrapped.module, example_inputs=wrapped.inputs, task="custom",
                        description=f"{name}, called as {wrapped.description}", dynamic_dims=wrapped.dynamic_dims)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return ZooModel(name=name, module=module, example_inputs=inputs, task="custom",
                    description=f"{name} (a PyTorch module)")


def _with_arguments(recipe: Recipe, calibration: Any, target: str | None, teacher: Any, seed: int | None,
                    report: Any) -> Recipe:
    changes: dict[str, Any] = {}
    if isinstance(calibration, int) and not isinstance(calibration, bool):
        changes["calibration"] = Calibration(recipe.calibration.source, recipe.calibration.split, calibration)
    elif isinstance(calibration, str):
        changes["calibration"] = Calibration(calibration, recipe.calibration.split, recipe.calibration.batches)
    if target is not None:
        changes["target"] = target
    if isinstance(teacher, str):
        changes["teacher"] = teacher
    if seed is not None:
        changes["seed"] = seed
    if report is not None:
        changes["report"] = str(report)
    return recipe.replace(**changes) if changes else recipe


def _batches(calibration: Any) -> list[tuple] | None:
    if calibration is None or isinstance(calibration, (int, str)):
        return None
    if not isinstance(calibration, (list, tuple)):
        raise RecipeError(f"compress: calibration is a list of input tuples, a number of batches or a source, "
                          f"not {type(calibration).__name__}")
    return [tuple(batch) if isinstance(batch, (tuple, list)) else (batch,) for batch in calibration]


def _is_recipe(value: Any) -> bool:
    return isinstance(value, (Recipe, str, os.PathLike, Mapping))


__all__ = ["Compressed", "as_recipe", "as_zoo_model", "compress"]
