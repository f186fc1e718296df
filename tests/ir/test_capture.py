"""Capture of real models is exact, keeps module paths, counts parameters exactly, and never
changes the user's model."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import CaptureError
from fxpress.ir.printer import format_graph

SMALL = ["vit-mnist", "cnn-digits", "bnn-digits", "gdnet-lite"]


def _state(module: torch.nn.Module) -> dict:
    return {k: (id(v), v._version, v.clone()) for k, v in module.state_dict(keep_vars=True).items()}


def _assert_unchanged(module: torch.nn.Module, before: dict, training: bool) -> None:
    after = module.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and module.training == training
    for key, (ident, version, value) in before.items():
        assert id(after[key]) == ident and after[key]._version == version
        assert torch.equal(after[key], value)


@pytest.mark.parametrize("name", SMALL)
def test_small_zoo_models_capture_exactly(zoo_model, name):
    model = zoo_model(name)
    before = _state(model.module)
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims)
    assert torch.equal(graph(*model.example_inputs), model.module(*model.example_inputs))
    other = tuple(torch.cat([x, x, x]) for x in model.example_inputs)  # dynamic batch of 6
    assert torch.equal(graph(*other), model.module(*other))
    assert graph.num_params == sum(p.numel() for p in model.module.parameters())
    fxpress.verify(graph)
    _assert_unchanged(model.module, before, training=False)


def test_minilm_capture_is_exact_with_paths(zoo_model):
    model = zoo_model("minilm")
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims)
    hf = model.module.model
    assert graph.num_params == sum(p.numel() for p in hf.parameters()) == 22_713_216
    assert torch.equal(graph(*model.example_inputs), model.module(*model.example_inputs))
    batch = model.tokenizer(["one", "two words", "a somewhat longer third sentence here"],
                            padding=True, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(graph(*inputs), model.module(*inputs), rtol=0, atol=1e-6)
    text = format_graph(graph)
    assert "# model.encoder.layer.3.attention.self.query (Linear)" in text
    assert "f32[2," in text


@pytest.mark.slow
def test_smollm2_capture_is_exact_with_paths(zoo_model):
    model = zoo_model("smollm2")
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims)
    assert graph.num_params == sum(p.numel() for p in model.module.parameters())
    assert torch.equal(graph(*model.example_inputs), model.module(*model.example_inputs))
    longer = torch.randint(0, 1000, (1, 13))
    torch.testing.assert_close(graph(longer), model.module(longer), rtol=0, atol=1e-5)
    paths = {graph.info(n).module_path for n in graph.fx.nodes}
    assert any(p.endswith("model.layers.7.self_attn.q_proj") for p in paths)
    assert sum(1 for p in paths if p.endswith("self_attn.q_proj")) == 30


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch: cannot be captured
            return self.fc(x)
        return x


def test_uncapturable_model_error_names_line_and_fix():
    model = Branchy().train()
    before = _state(model)
    with pytest.raises(CaptureError) as err:
        fxpress.capture(model, (torch.ones(2, 3),))
    message = str(err.value)
    assert "cannot capture Branchy" in message and "test_capture.py" in message
    assert "if x.sum() > 0" in message and "torch.cond" in message and "\n" not in message
    _assert_unchanged(model, before, training=True)


def test_bad_capture_arguments():
    with pytest.raises(CaptureError, match="expects a torch.nn.Module"):
        fxpress.capture(lambda x: x, (torch.ones(1),))
    with pytest.raises(CaptureError, match="unknown capture method"):
        fxpress.capture(Branchy(), (torch.ones(1, 3),), method="jit")
    with pytest.raises(CaptureError, match="dynamic dim 2 of input 0 does not exist"):
        fxpress.capture(Branchy(), (torch.ones(1, 3),), dynamic={0: {2: "x"}})


def test_static_dim_requested_dynamic_is_explained():
    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return x.reshape(4, -1)

    with pytest.raises(CaptureError, match="fixes a dim you asked to be dynamic"):
        fxpress.capture(FixedBatch(), (torch.ones(4, 3),), dynamic=True)


def test_symbolic_trace_capture():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    graph = fxpress.trace(model, (torch.randn(2, 4),))
    assert graph.source == "symbolic_trace"
    assert [n.op for n in graph.fx.nodes] == ["placeholder", "call_module", "call_module", "output"]
    assert graph.macs == 2 * 4 * 4
    with pytest.raises(CaptureError, match="method='export'"):
        fxpress.trace(Branchy(), (torch.ones(1, 3),))
