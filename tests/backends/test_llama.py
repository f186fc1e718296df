"""LLaMA prefill logits on llvm and onnx: a tiny random LlamaForCausalLM (no download), then
SmolLM2 (slow).

Tolerances (max abs error vs eager, float32): tiny LLaMA 1e-4 (observed ~2e-7 on onnx);
SmolLM2 1e-3 of the logit scale (max |logit|) with identical argmax next tokens (observed
~9e-5 abs against a scale of ~35 on onnx).

The fix they need: TVM's importer kept ``bool`` for ``cumsum`` of a bool mask (torch gives
int64) and LLVM failed adding booleans; ``aten_rules.lower_cumsum`` promotes like torch.
"""
from __future__ import annotations

import pytest
import torch

from fxpress import backends
from fxpress.ir import capture


class CausalLMLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


class BoolCumsum(torch.nn.Module):
    def forward(self, mask):
        return torch.cumsum(mask, dim=1), torch.cumsum(mask.int(), dim=-1), torch.cumsum(mask.float(), 1)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = CausalLMLogits(LlamaForCausalLM(config).eval()).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 12))
    compiled = backends.compile(capture(model, (input_ids,), name="tiny-llama"), "llvm")
    return model, input_ids, compiled


def test_cumsum_promotes_like_torch():
    mask = torch.rand(3, 7) > 0.5
    model = BoolCumsum()
    compiled = backends.compile(capture(model, (mask,), name="cumsum"), "llvm")
    for got, expected in zip(compiled(mask), model(mask)):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_tiny_llama_logits_match_eager(tiny_llama):
    model, input_ids, compiled = tiny_llama
    with torch.no_grad():
        expected = model(input_ids)
    got = compiled(input_ids)
    assert got.shape == expected.shape == (2, 12, 128)
    assert (got - expected).abs().max().item() < 1e-4


def test_tiny_llama_onnx_logits_match_eager(tiny_llama):
    model, input_ids, _ = tiny_llama
    compiled = backends.compile(capture(model, (input_ids,), name="tiny-llama"), "onnx")
    assert compiled.target == "onnx"
    with torch.no_grad():
        expected = model(input_ids)
    got = compiled(input_ids)
    assert got.shape == expected.shape == (2, 12, 128)
    assert (got - expected).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_tiny_llama_ties_embedding_and_head(tiny_llama):
    model = tiny_llama[0].model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_smollm2_prefill_logits_match_eager(zoo_model):
    """30 layers: error bounded relative to the logit scale (1e-3), same next tokens."""
    model = zoo_model("smollm2")
    graph = capture(model.module, model.example_inputs, name="smollm2")
    compiled = backends.compile(graph, "llvm")
    with torch.no_grad():
        expected = model.module(*model.example_inputs)
    got = compiled(*model.example_inputs)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-3 * scale
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_smollm2_onnx_prefill_logits_match_eager(zoo_model):
    """ONNX export (torch.onnx dynamo) + onnxruntime: same bound as llvm, same next tokens."""
    model = zoo_model("smollm2")
    graph = capture(model.module, model.example_inputs, name="smollm2")
    compiled = backends.compile(graph, "onnx")
    assert compiled.target == "onnx"
    with torch.no_grad():
        expected = model.module(*model.example_inputs)
    got = compiled(*model.example_inputs)
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-3 * scale
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
