"""Shared test set-up: one thread (OpenMP spinning under load makes 2 threads slower), zoo models
loaded once per session."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
# pytest-xdist workers set COLUMNS=80; the CLI's tables (run in-process by tests) would be cut at 80
# columns. Without it the CLI prints 160-column tables to a pipe, as it does in CI logs.
os.environ.pop("COLUMNS", None)


@pytest.fixture(scope="session")
def zoo_model():
    """Load a zoo model once per session: zoo_model("vit-mnist")."""
    from fxpress.zoo import load_model

    cache: dict = {}

    def load(name: str):
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]

    return load


@pytest.fixture(scope="session")
def tiny_llama_graph():
    """(the tiny random LLaMA of model_factories, its captured graph), made once per session."""
    import fxpress
    from model_factories import tiny_llama, token_batches

    model = tiny_llama()
    return model, fxpress.capture(model, token_batches(1, seed=0)[0])
