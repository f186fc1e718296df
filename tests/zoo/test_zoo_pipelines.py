"""The cleanup pipeline on every zoo model keeps outputs equal and is idempotent."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.passes import NumericCheck, PassContext, PassManager, VerifyAfterPass
from fxpress.eval import calibration_batches

CLEANUP = "fold-constants,fuse-batchnorm,dce"
MODELS = ["vit-mnist", "cnn-digits", "bnn-digits", "gdnet-lite", "minilm",
          pytest.param("smollm2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", MODELS)
def test_cleanup_pipeline_preserves_outputs_and_is_idempotent(zoo_model, name):
    model = zoo_model(name)
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims)
    ctx = PassContext(calibration=calibration_batches(model, count=2, batch_size=2))
    manager = PassManager(CLEANUP, [VerifyAfterPass(), NumericCheck()])
    first = manager.run(graph, ctx)
    for batch in ctx.calibration:
        torch.testing.assert_close(first.graph(*batch), model.module(*batch), rtol=1e-4, atol=1e-5)
    assert first.graph.num_params <= graph.num_params
    second = manager.run(first.graph, ctx)
    assert [r.modified for r in second.reports] == [False, False, False]
    assert second.graph.module.code == first.graph.module.code


def test_cnn_digits_batchnorms_are_fused(zoo_model):
    model = zoo_model("cnn-digits")
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims)
    result = PassManager(CLEANUP, [NumericCheck()]).run(graph, PassContext())
    fused = result.reports[1].stats["fused_pairs"]
    bn_count = sum(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in model.module.modules())
    assert len(fused) == bn_count > 0
    ops = {str(n.target) for n in result.graph.fx.nodes}
    assert not any("batch_norm" in op for op in ops)
