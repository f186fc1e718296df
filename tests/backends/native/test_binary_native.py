"""`run_native`: graphs with binary ops on the C kernels give the graph's outputs bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress.backends.native import NativeBinaryLayer, run_native
from fxpress.errors import LoweringError
from fxpress.passes import PassManager
from fxpress.zoo import load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bnn():
    model = load_model("bnn-digits")
    return model, fxpress.capture(model.module, model.example_inputs, dynamic=True)


@pytest.mark.parametrize("pipeline", ["binarize", "binarize,xnor-mst", "binarize,xnor-mst{depth_bound=2}"])
def test_bnn_digits_on_native_kernels_equals_eager(bnn, pipeline):
    model, graph = bnn
    program = run_native(PassManager(pipeline).run(graph).graph)
    assert program.lowered == ["bconv1", "bconv2", "bfc"]
    layers = [m for m in program.graph.module.modules() if isinstance(m, NativeBinaryLayer)]
    assert len(layers) == 3 and all((layer.plan is not None) == ("xnor-mst" in pipeline) for layer in layers)
    for batch in (1, 64):
        images = torch.rand(batch, 1, 8, 8)
        assert torch.equal(program(images), model.module(images))


class PaddedNet(nn.Module):
    """Padding, stride, bias and odd sizes: what bnn-digits does not exercise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 5, 3)
        self.body = nn.Conv2d(5, 7, (3, 2), stride=(2, 1), padding=(2, 1), bias=True)
        self.mid = nn.Linear(7 * 4 * 5, 65)
        self.head = nn.Linear(65, 2)

    def forward(self, x):
        return self.head(self.mid(self.body(self.stem(x) - 0.05).flatten(1)))


@pytest.mark.parametrize("pipeline", ["binarize", "binarize,xnor-mst"])
def test_padded_strided_layers_with_bias_on_native_kernels(pipeline):
    graph = fxpress.capture(PaddedNet().eval(), (torch.randn(2, 3, 7, 6),))
    compressed = PassManager(pipeline).run(graph).graph
    program = run_native(compressed)
    assert program.lowered == ["body", "mid"]
    x = torch.randn(2, 3, 7, 6)
    assert torch.equal(program(x), compressed(x))


def test_graph_without_binary_ops_runs_unchanged():
    graph = fxpress.capture(PaddedNet().eval(), (torch.randn(2, 3, 7, 6),))
    program = run_native(graph)
    x = torch.randn(2, 3, 7, 6)
    assert program.lowered == [] and torch.equal(program(x), graph(x))


def test_weights_that_depend_on_inputs_cannot_be_lowered():
    class InputWeight(nn.Module):
        def forward(self, x, w):
            return torch.ops.fxpress.binary_linear(x, w, None, None)

    graph = fxpress.capture(InputWeight(), (torch.randn(2, 8), torch.randn(3, 8)))
    with pytest.raises(LoweringError, match="weight of .* depends on the inputs"):
        run_native(graph)
