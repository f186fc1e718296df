"""Evaluation test helpers: the tiny random HF models of tiny_models.py (also a `fxpress run` MODEL file)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TINY_MODELS = Path(__file__).with_name("tiny_models.py")


@pytest.fixture(scope="session")
def tiny():
    """The tiny_models module (loaded by path: test folders are not packages here)."""
    spec = importlib.util.spec_from_file_location("fxpress_tests_tiny_models", TINY_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
