"""Fixtures shared by the quantization pass tests."""
from __future__ import annotations

import pytest

import fxpress
from fxpress.eval import calibration_batches
from fxpress.passes import PassContext


@pytest.fixture(scope="module")
def vit(zoo_model):
    """vit-mnist captured at a static batch of 100, with two calibration batches."""
    model = zoo_model("vit-mnist")
    images = model.example_inputs[0]
    graph = fxpress.capture(model.module, (images[:1].expand(100, 1, 28, 28).contiguous(),))
    return graph, PassContext(calibration=calibration_batches(model, 2, like=graph))
