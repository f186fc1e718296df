"""MODEL arguments: a zoo name, a Hugging Face model folder or GGUF file, or `path/to/file.py:factory`."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from fxpress.errors import ZooError
from fxpress.zoo import ZooModel, from_pretrained, list_models, load_model


def resolve_model(spec: str, task: str | None = None) -> ZooModel:
    """Load a zoo model by name, a Hugging Face folder or GGUF file (`from_pretrained`, with `task`), or call
    `factory()` from a Python file.

    The factory returns a ZooModel, or `(module, example_inputs)`.
    """
    if spec in list_models():
        model = load_model(spec)
        if task is not None and task != model.task:
            raise ZooError(f"zoo model '{spec}' is a {model.task} model; a task applies to Hugging Face folders "
                           f"and GGUF files, not to zoo models")
        return model
    path = Path(spec).expanduser()
    if path.is_dir() or path.suffix.lower() == ".gguf":
        return from_pretrained(path, task=task)
    if ":" not in spec:
        raise ZooError(f"unknown model '{spec}': MODEL is a zoo name ({', '.join(list_models())}), a Hugging Face "
                       "model folder, a .gguf file, or path/to/file.py:factory")
    path_text, _, factory_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ZooError(f"model file {path} does not exist; MODEL is a zoo name "
                       f"({', '.join(list_models())}) or path/to/file.py:factory")
    module_spec = importlib.util.spec_from_file_location(f"fxpress_user_model_{path.stem}", path)
    user_module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(user_module)
    except Exception as err:  # noqa: BLE001 - user code may raise anything
        raise ZooError(f"importing {path} failed: {type(err).__name__}: {err}") from err
    factory = getattr(user_module, factory_name, None)
    if not callable(factory):
        raise ZooError(f"{path} has no callable '{factory_name}'")
    return _as_zoo_model(factory(), f"{path.stem}:{factory_name}")


def _as_zoo_model(made: object, name: str) -> ZooModel:
    if isinstance(made, ZooModel):
        return made
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        module, inputs = made
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return ZooModel(name=name, module=module, example_inputs=inputs,
                        description=f"user model from {name}", task="custom")
    raise ZooError(f"factory {name} returned {type(made).__name__}; return a ZooModel or "
                   f"(nn.Module, example_inputs)")
