"""Capture of raw Hugging Face models (no wrapper written by the user), dynamic dims from batch-1
examples, and capture errors that say what went wrong."""
from __future__ import annotations

import warnings

import pytest
import torch

import fxpress
from fxpress.errors import CaptureError
from fxpress.ir.printer import format_graph
from hf_factories import minilm_tokenizer, tiny_model


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_raw_causal_lm_captures_without_a_wrapper_from_batch_one():
    model = tiny_model("llama")
    before = _state(model)
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    graph = fxpress.capture(model, (ids,))
    assert graph.wrapper == "LlamaForCausalLM(input_ids, use_cache=False).logits; dynamic: input 0 dims batch, seq"
    assert "# captured as LlamaForCausalLM(input_ids, use_cache=False).logits" in format_graph(graph)
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    assert [n.target for n in graph.fx.nodes if n.op == "placeholder"] == ["input_ids"]
    with torch.no_grad():
        for shape in ((1, 6), (4, 5), (1, 1)):  # batch 1 example, evaluated at batch 4 and at one token
            other = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(1))
            assert torch.equal(graph(other), model(input_ids=other, use_cache=False).logits)
    assert model.training is False and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_encoder_takes_a_tokenizer_batch_and_selects_its_output():
    model = tiny_model("bert")
    batch = minilm_tokenizer()(["a short one", "a somewhat longer sentence here"], padding=True,
                               return_tensors="pt")
    graph = fxpress.capture(model, batch)
    names = [n.target for n in graph.fx.nodes if n.op == "placeholder"]
    assert names == ["input_ids", "token_type_ids", "attention_mask"]
    inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    with torch.no_grad():
        reference = model(**batch)
        assert torch.allclose(graph(*inputs), reference.last_hidden_state, atol=1e-6)
        pooled = fxpress.capture(model, batch, output="mean_pooled")
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (reference.last_hidden_state * mask).sum(1) / mask.sum(1)
        assert pooled(*inputs).shape == (2, 32) and torch.allclose(pooled(*inputs), expected, atol=1e-6)
        assert torch.allclose(fxpress.capture(model, batch, output="pooler_output")(*inputs),
                              reference.pooler_output, atol=1e-6)


def test_unknown_output_names_the_choices():
    model = tiny_model("llama")
    with pytest.raises(CaptureError, match="has no tensor 'pooled'; choose output= one of logits"):
        fxpress.capture(model, (torch.zeros(1, 4, dtype=torch.long),), output="pooled")
    with pytest.raises(CaptureError, match="selects a Hugging Face model's output"):
        fxpress.capture(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), output="logits")


class _Result:
    def __init__(self, tensor):
        self.tensor = tensor


class _ReturnsObject(torch.nn.Module):
    def forward(self, x):
        return _Result(x + 1)


def test_non_tensor_output_is_one_line_naming_the_type():
    with pytest.raises(CaptureError) as caught:
        fxpress.capture(_ReturnsObject(), (torch.zeros(2, 3),))
    message = str(caught.value)
    assert "\n" not in message
    assert "_Result, which is not tensors" in message and "return a tensor" in message


class _FixedBatch(torch.nn.Module):
    def forward(self, x):
        return x.reshape(2, -1).sum(-1)


def test_capture_error_keeps_the_cause_line_of_torch():
    with pytest.raises(CaptureError) as caught:
        fxpress.capture(_FixedBatch(), (torch.zeros(2, 3),), dynamic=True)
    message = str(caught.value)
    assert "\n" not in message and "<string>:1" not in message
    assert "Constraints violated" in message
    assert "specialized it to be a constant (2)" in message  # torch's line saying which dim and why
    assert "leave that dim static" in message


def test_dynamic_batch_from_a_batch_one_example_captures_from_a_copy():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()).eval()
    graph = fxpress.capture(model, (torch.randn(1, 3),), dynamic=True)
    assert graph.example_inputs[0].shape == (2, 3)
    other = torch.randn(5, 3)
    assert torch.equal(graph(other), model(other))


def test_training_mode_warns_only_where_it_changes_results():
    model = tiny_model("bert").train()
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.warns(UserWarning, match="in training mode: .* call model.eval"):
        fxpress.capture(model, (ids,))
    assert model.training  # capture warned and left the mode alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxpress.capture(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))  # training mode, but nothing differs
