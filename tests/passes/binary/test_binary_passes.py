"""binarize and xnor-mst on real graphs: structure, exact numerics, errors, training through the ops."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import PreconditionError
from fxpress.ir.printer import format_graph
from fxpress.ir.verify import verify
from fxpress.passes import NumericCheck, PassContext, PassManager, VerifyAfterPass
from fxpress.ops.binary import MST_OPS, TRAINABLE_OPS
from fxpress.zoo import BinaryConv2d, BinaryLinear, load_model

torch.set_num_threads(1)
CHECKED = [VerifyAfterPass(), NumericCheck()]


@pytest.fixture(scope="module")
def bnn():
    model = load_model("bnn-digits")
    return model, fxpress.capture(model.module, model.example_inputs, dynamic=True)


@pytest.fixture(scope="module")
def planned(bnn):
    return PassManager("binarize,xnor-mst", CHECKED).run(bnn[1])


class FloatNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 6, 3, padding=1, bias=True)
        self.mid = nn.Linear(6 * 5 * 5, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x)) - 0.1)
        return self.head(self.mid(x.flatten(1)))


def ops_in(graph, targets) -> list[str]:
    return [graph.info(n).module_path for n in graph.fx.nodes if n.op == "call_function" and n.target in targets]


def test_binarize_recognizes_bnn_digits_layers_exactly(bnn, planned):
    model, graph = bnn
    report = planned.reports[0]
    assert report.stats["recognized"] == ["bconv1", "bconv2", "bfc"] and report.stats["binarized"] == []
    assert report.stats["kept_float"] == ["conv", "fc"] and report.error["max_abs"] == 0.0
    binarized = PassManager("binarize").run(graph).graph
    assert ops_in(binarized, TRAINABLE_OPS) == ["bconv1", "bconv2", "bfc"]
    text = format_graph(binarized)
    assert ("fxpress.binary_conv2d(%batch_norm, %bconv1_weight, %mean, None, [1, 1], [0, 0], [1, 1]) : "
            "f32[2,64,6,6]  # bconv1 (BinaryConv2d) macs=1327104") in text
    assert "aten.where" not in text and "aten.ge" not in text
    images = torch.rand(9, 1, 8, 8)
    assert torch.equal(binarized(images), model.module(images))
    assert not PassManager("binarize").run(binarized).modified  # idempotent


def test_xnor_mst_on_bnn_digits_is_exact_and_reports_bit_ops(bnn, planned):
    model, _ = bnn
    stats, graph = planned.reports[1].stats, planned.graph
    assert [row["layer"] for row in stats["layers"]] == ["bconv1", "bconv2", "bfc"]
    for row in stats["layers"]:
        assert row["dense_bitops"] == row["c_out"] * row["k"]
        assert row["mst_bitops"] == row["k"] + row["mst_weight"] and row["ratio"] > 1.5 and row["depth"] >= 1
    assert stats["ratio"] == round(stats["dense_bitops_per_sample"] / stats["mst_bitops_per_sample"], 3)
    assert ops_in(graph, MST_OPS) == ["bconv1", "bconv2", "bfc"]
    assert planned.reports[1].error["max_abs"] == 0.0
    assert planned.reports[1].after["macs"] < planned.reports[1].before["macs"]
    assert planned.reports[1].after["params"] < planned.reports[1].before["params"]  # latent weights are gone
    images = torch.rand(33, 1, 8, 8)
    assert torch.equal(graph(images), model.module(images))
    assert not PassManager("xnor-mst").run(graph).modified


def test_depth_bound_limits_every_layer_and_stays_exact(bnn):
    model, graph = bnn
    result = PassManager("binarize,xnor-mst{depth_bound=2}", CHECKED).run(graph)
    rows = result.reports[1].stats["layers"]
    assert all(row["depth"] <= 2 and row["mst_weight"] >= row["spanning_weight"] for row in rows)
    images = torch.rand(5, 1, 8, 8)
    assert torch.equal(result.graph(images), model.module(images))


def test_xnor_mst_before_binarize_says_to_run_binarize(bnn):
    with pytest.raises(PreconditionError, match="run 'binarize' before 'xnor-mst'"):
        PassManager("xnor-mst").run(bnn[1])


def test_xnor_mst_on_float_layers_does_nothing_or_names_the_layer():
    graph = fxpress.capture(FloatNet().eval(), (torch.randn(2, 1, 5, 5),))
    result = PassManager("xnor-mst").run(graph)
    assert not result.modified and result.graph is graph and result.reports[0].stats["layers"] == []
    with pytest.raises(PreconditionError, match="'mid' is not a binary op.*binarize"):
        PassManager("xnor-mst{layers=mid}").run(graph)
    with pytest.raises(PreconditionError, match="no binary layer at 'nope'"):
        PassManager("xnor-mst{layers=nope}").run(graph)


def test_binarize_float_layers_keeps_first_and_last_float():
    model = FloatNet().eval()
    graph = fxpress.capture(model, (torch.randn(2, 1, 5, 5),))
    result = PassManager("binarize", CHECKED).run(graph, PassContext(calibration=[(torch.randn(2, 1, 5, 5),)]))
    stats = result.reports[0].stats
    assert stats["binarized"] == ["body", "mid"] and stats["kept_float"] == ["stem", "head"]
    assert result.reports[0].error["max_abs"] > 0  # lossy, and the report says how much
    assert ops_in(result.graph, TRAINABLE_OPS) == ["body", "mid"]
    assert not PassManager("binarize").run(result.graph).modified
    chosen = PassManager("binarize{layers=head,scale=none}").run(graph).reports[0].stats
    assert chosen["binarized"] == ["head"]
    with pytest.raises(PreconditionError, match="no conv2d/linear layer at nope"):
        PassManager("binarize{layers=nope}").run(graph)


def test_binarized_float_model_lowers_through_mst_exactly():
    graph = fxpress.capture(FloatNet().eval(), (torch.randn(2, 1, 5, 5),))
    binary = PassManager("binarize").run(graph).graph
    planned = PassManager("xnor-mst{depth_bound=1}", CHECKED).run(binary)
    x = torch.randn(6, 1, 5, 5)
    assert torch.equal(planned.graph(x), binary(x))


def test_ste_gradients_match_the_eager_binary_modules():
    torch.manual_seed(0)
    conv, linear = BinaryConv2d(3, 5, 3, padding=1), BinaryLinear(20, 4)

    def conv_op(x, weight, scale):
        return torch.ops.fxpress.binary_conv2d(x, weight, scale, conv.bias, [1, 1], [1, 1], [1, 1])

    def linear_op(x, weight, scale):
        return torch.ops.fxpress.binary_linear(x, weight, scale, linear.bias)

    for module, inputs, op in ((conv, torch.randn(2, 3, 6, 6) * 1.5, conv_op),
                               (linear, torch.randn(3, 20) * 1.5, linear_op)):
        module.train()
        eager_input = inputs.clone().requires_grad_(True)
        module(eager_input).square().sum().backward()
        op_input = inputs.clone().requires_grad_(True)
        op_weight = module.weight.detach().clone().requires_grad_(True)
        op(op_input, op_weight, op_weight.abs().flatten(1).mean(1)).square().sum().backward()
        assert torch.allclose(op_input.grad, eager_input.grad, atol=1e-5)
        assert torch.allclose(op_weight.grad, module.weight.grad, atol=1e-5)


def test_binarized_graph_fine_tunes_and_re_exports(bnn):
    graph = PassManager("binarize").run(bnn[1]).graph.copy(clone_params=True)
    module = graph.module.train()
    before = module.bconv1.weight.detach().clone()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(module(torch.rand(8, 1, 8, 8)), torch.arange(8))
    loss.backward()
    assert module.bconv1.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(module.bconv1.weight, before)
    planned = PassManager("binarize,xnor-mst").run(bnn[1]).graph
    again = fxpress.capture(planned.module.eval(), (torch.rand(3, 1, 8, 8),))  # fake impls at work
    verify(again)
    assert len(ops_in(again, MST_OPS)) == 3


def test_xnor_mst_refuses_weights_computed_from_inputs():
    class InputWeight(nn.Module):
        def forward(self, x, w):
            return torch.ops.fxpress.binary_linear(x, w, None, None)

    graph = fxpress.capture(InputWeight(), (torch.randn(2, 8), torch.randn(3, 8)))
    with pytest.raises(PreconditionError, match="weight of .* depends on the inputs"):
        PassManager("xnor-mst").run(graph)
