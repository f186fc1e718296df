"""Read and write the trained fixtures shipped in ``fxpress/zoo/fixtures/``.

A fixture is two files named after the zoo model (``-`` becomes ``_``):

- ``<name>.safetensors``: the module's state dict (float32, never pickled);
- ``<name>.json``: what the weights are: architecture config, metrics on
  the held-out split, the dataset, seed, training time, library versions
  and the command that reproduces them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fxpress.errors import ZooError

log = logging.getLogger(__name__)

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures"


def fixture_paths(name: str, directory: Path = FIXTURE_DIR) -> tuple[Path, Path]:
    """The ``(weights, metadata)`` paths of fixture ``name``."""
    stem = name.replace("-", "_")
    return directory / f"{stem}.safetensors", directory / f"{stem}.json"


def save_fixture(name: str, module: torch.nn.Module, meta: dict, directory: Path = FIXTURE_DIR) -> tuple[Path, Path]:
    """Write ``module``'s state dict and ``meta`` as fixture ``name``."""
    weights_path, meta_path = fixture_paths(name, directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous().clone() for key, value in module.state_dict().items()}
    save_file(state, str(weights_path), metadata={"fxpress_fixture": name})
    weights_path.chmod(0o644)  # safetensors writes 0600
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("wrote fixture %s (%d bytes) and %s", weights_path, weights_path.stat().st_size, meta_path)
    return weights_path, meta_path


def load_fixture(name: str, script: str, directory: Path = FIXTURE_DIR) -> tuple[dict[str, torch.Tensor], dict]:
    """Read fixture ``name``: ``(state_dict, meta)``.

    ``script`` names the training script to suggest if the files are gone.
    """
    weights_path, meta_path = fixture_paths(name, directory)
    if not weights_path.is_file() or not meta_path.is_file():
        raise ZooError(
            f"model '{name}': fixture {weights_path.name} or {meta_path.name} is missing "
            f"from {directory}; recreate it with `python {script}`"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return load_file(str(weights_path)), meta
