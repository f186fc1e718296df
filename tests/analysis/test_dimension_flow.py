"""Dimension flow (fxpress.analysis.dimension_flow): exact coupled slices on a tiny LLaMA, MiniLM, the digits
CNN and SmolLM2, checked against the eager models (zeroing a group = masking its channel; removing a group's
slices leaves a model that runs and computes the masked model)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_factories import token_batches
from torch import nn

import fxpress
from fxpress.analysis.dimension_flow import (ParamSlice, channel_group, dimension_group, head_group,
                                             kv_head_group)
from fxpress.errors import PreconditionError
from fxpress.ir.opinfo import op_info
from fxpress.ops.coupling_rules import COUPLING_RULES

aten = torch.ops.aten
LAYER = "model.model.layers.3"


def rows(path: str, start: int, stop: int, dim: int = 0) -> ParamSlice:
    return ParamSlice(path, dim, tuple(range(start, stop)))


def mlp_slices(layer: str, i: int) -> list[ParamSlice]:
    return [ParamSlice(f"{layer}.mlp.gate_proj.weight", 0, (i,)), ParamSlice(f"{layer}.mlp.up_proj.weight", 0, (i,)),
            ParamSlice(f"{layer}.mlp.down_proj.weight", 1, (i,))]


def kv_slices(layer: str, j: int, group: int, head_dim: int) -> list[ParamSlice]:
    attn, queries = f"{layer}.self_attn", range(j * group * head_dim, (j + 1) * group * head_dim)
    return [rows(f"{attn}.q_proj.weight", queries.start, queries.stop),
            rows(f"{attn}.k_proj.weight", j * head_dim, (j + 1) * head_dim),
            rows(f"{attn}.v_proj.weight", j * head_dim, (j + 1) * head_dim),
            rows(f"{attn}.o_proj.weight", queries.start, queries.stop, dim=1)]


# -- eager references -----------------------------------------------------------------------------
def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    found: dict[int, list] = {}
    for module in model.modules():
        for leaf, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                found.setdefault(id(tensor), []).append((module, leaf))
    return found


def _tensor(model: nn.Module, path: str) -> torch.Tensor:
    owner, _, leaf = path.rpartition(".")
    return getattr(model.get_submodule(owner), leaf)


def zero_slices(model: nn.Module, slices: list[ParamSlice]) -> nn.Module:
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for piece in slices:
            _tensor(copied, piece.path).index_fill_(piece.dim, torch.tensor(piece.indices), 0.0)
    return copied


def remove_slices(model: nn.Module, slices: list[ParamSlice]) -> nn.Module:
    """Structural pruning: every slice cut out (a tied tensor once, in every module that holds it)."""
    copied = copy.deepcopy(model)
    holders = _holders(copied)
    originals = {piece.path: _tensor(copied, piece.path) for piece in slices}
    current = {id(t): t.detach() for t in originals.values()}
    for key in {(id(originals[p.path]), p.dim, p.indices) for p in slices}:
        tensor_id, dim, indices = key
        keep = torch.tensor([i for i in range(current[tensor_id].shape[dim]) if i not in indices])
        current[tensor_id] = current[tensor_id].index_select(dim, keep)
    for tensor_id, new in current.items():
        for module, leaf in holders[tensor_id]:
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(new, requires_grad=False)
            else:
                module._buffers[leaf] = new
    return copied


def masked(model: nn.Module, path: str, dim: int, indices: list[int], *, before: bool) -> nn.Module:
    """The model with `indices` along `dim` zeroed at the input (before=True) or output of module `path`."""
    copied = copy.deepcopy(model)
    index = torch.tensor(indices)

    def zero(value: torch.Tensor) -> torch.Tensor:
        return value.index_fill(dim, index, 0.0)

    module = copied.get_submodule(path)
    if before:
        module.register_forward_pre_hook(lambda m, args: (zero(args[0]), *args[1:]))
    else:
        module.register_forward_hook(lambda m, args, out: zero(out))
    return copied


def assert_group_is_the_masked_channel(model, slices, reference, inputs, exact=True):
    with torch.no_grad():
        expected = reference(*inputs)
        zeroed = zero_slices(model, slices)(*inputs)
        pruned = remove_slices(model, slices)(*inputs)
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(zeroed, expected, **tolerance)
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)


# -- tiny LLaMA (4 layers, hidden 32, 4 heads / 2 KV heads of 8, MLP 64) -------------------------
@pytest.fixture(scope="module")
def llama(tiny_llama_graph):
    return tiny_llama_graph


def test_llama_mlp_channel(llama):
    _, graph = llama
    assert channel_group(graph, f"{LAYER}.mlp.gate_proj", 5).slices == mlp_slices(LAYER, 5)
    assert channel_group(graph, f"{LAYER}.mlp.up_proj", 5).slices == mlp_slices(LAYER, 5)


def test_llama_kv_head_couples_its_query_heads(llama):
    _, graph = llama
    assert kv_head_group(graph, f"{LAYER}.self_attn", 1).slices == kv_slices(LAYER, 1, group=2, head_dim=8)


def test_llama_query_head_keeps_its_shared_kv_head(llama):
    _, graph = llama
    attn = f"{LAYER}.self_attn"
    assert head_group(graph, attn, 3).slices == [rows(f"{attn}.q_proj.weight", 24, 32),
                                                 rows(f"{attn}.o_proj.weight", 24, 32, dim=1)]


def test_llama_residual_channel_reaches_every_layer_and_the_tied_head(llama):
    _, graph = llama
    group = channel_group(graph, "model.model.embed_tokens", 7)
    assert group.slices[0] == ParamSlice("model.lm_head.weight", 1, (7,))  # tied with the embedding
    for i in range(4):
        layer = f"model.model.layers.{i}"
        for name, dim in (("input_layernorm", 0), ("self_attn.q_proj", 1), ("self_attn.k_proj", 1),
                          ("self_attn.v_proj", 1), ("self_attn.o_proj", 0), ("post_attention_layernorm", 0),
                          ("mlp.gate_proj", 1), ("mlp.up_proj", 1), ("mlp.down_proj", 0)):
            assert ParamSlice(f"{layer}.{name}.weight", dim, (7,)) in group.slices
    assert group.slices[-1] == ParamSlice("model.model.norm.weight", 0, (7,))
    assert len(group.slices) == 1 + 4 * 9 + 1
    assert channel_group(graph, "model.model.layers.2.self_attn.o_proj", 7).slices == group.slices


def test_llama_groups_match_the_eager_model(llama):
    model, _ = llama
    graph = llama[1]
    inputs = token_batches(1, seed=3)[0]
    mlp = channel_group(graph, f"{LAYER}.mlp.gate_proj", 5).slices
    assert_group_is_the_masked_channel(model, mlp, masked(model, f"{LAYER}.mlp.down_proj", -1, [5], before=True),
                                       inputs)
    kv = kv_head_group(graph, f"{LAYER}.self_attn", 1).slices
    reference = masked(model, f"{LAYER}.self_attn.o_proj", -1, list(range(16, 32)), before=True)
    assert_group_is_the_masked_channel(model, kv, reference, inputs, exact=False)


def test_llama_incomplete_group_cannot_be_removed(llama):
    model, graph = llama
    slices = channel_group(graph, f"{LAYER}.mlp.gate_proj", 5).slices
    with pytest.raises(RuntimeError):
        remove_slices(model, [s for s in slices if "up_proj" not in s.path])(*token_batches(1)[0])
    residual = channel_group(graph, "model.model.embed_tokens", 7).slices
    with torch.no_grad():
        assert remove_slices(model, residual)(*token_batches(1)[0]).shape == (2, 8, 64)


@settings(max_examples=10, deadline=None)
@given(layer=st.integers(0, 3), channel=st.integers(0, 63))
def test_property_group_is_a_fixed_point(llama, layer, channel):
    _, graph = llama
    group = channel_group(graph, f"model.model.layers.{layer}.mlp.gate_proj", channel)
    down = group.slices[-1]
    again = dimension_group(graph, f"model_model_layers_{layer}_mlp_down_proj_weight", down.dim, down.indices)
    assert again.slices == group.slices == mlp_slices(f"model.model.layers.{layer}", channel)


def test_printed_group_reads_as_pruning_steps(llama):
    _, graph = llama
    text = str(channel_group(graph, f"{LAYER}.mlp.gate_proj", 5))
    assert text == "\n".join([
        f"dimension group: output channel 5 of {LAYER}.mlp.gate_proj (3 parameter slices)",
        f"  prune out-channels of {LAYER}.mlp.gate_proj.weight[5, :]",
        f"  => out-channels of {LAYER}.mlp.up_proj.weight[5, :]",
        f"  => in-channels of {LAYER}.mlp.down_proj.weight[:, 5]"])
    assert "q_proj.weight[16:32, :]" in str(kv_head_group(graph, f"{LAYER}.self_attn", 1))


# -- rules table and errors -----------------------------------------------------------------------
class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.cumsum(self.fc1(x), dim=-1))


def test_op_without_rule_is_a_clear_error():
    graph = fxpress.capture(Cumulative(), (torch.randn(3, 4),))
    with pytest.raises(PreconditionError, match=r"aten\.cumsum\.default has no coupling rule.*COUPLING_RULES "
                                                r"in fxpress/ops/coupling_rules\.py") as caught:
        channel_group(graph, "fc1", 2)
    assert "call_function[target=torch.ops.aten.cumsum.default]" in str(caught.value)


def test_rules_are_attached_to_opinfo_and_bad_seeds_refused(llama):
    assert op_info(aten.linear.default).coupling is COUPLING_RULES[aten.linear.default]
    _, graph = llama
    with pytest.raises(PreconditionError, match="out of range"):
        channel_group(graph, f"{LAYER}.mlp.gate_proj", 64)
    with pytest.raises(PreconditionError, match="reads a weight"):
        channel_group(graph, "model.model.nowhere", 0)


# -- MiniLM (BERT: 12 heads of 32, MLP 1536) ----------------------------------------------------
@pytest.fixture(scope="module")
def minilm(zoo_model):
    zoo = zoo_model("minilm")
    return zoo, fxpress.capture(zoo.module, zoo.example_inputs)


def test_minilm_head_and_mlp_channel(minilm):
    _, graph = minilm
    layer = "model.encoder.layer.2"
    head = []
    for name in ("query", "key", "value"):
        head += [rows(f"{layer}.attention.self.{name}.weight", 96, 128),
                 rows(f"{layer}.attention.self.{name}.bias", 96, 128)]
    head.append(rows(f"{layer}.attention.output.dense.weight", 96, 128, dim=1))
    assert head_group(graph, f"{layer}.attention", 3).slices == head
    assert kv_head_group(graph, f"{layer}.attention", 3).slices == head  # no grouped-query attention
    assert channel_group(graph, f"{layer}.intermediate.dense", 100).slices == [
        ParamSlice(f"{layer}.intermediate.dense.weight", 0, (100,)),
        ParamSlice(f"{layer}.intermediate.dense.bias", 0, (100,)),
        ParamSlice(f"{layer}.output.dense.weight", 1, (100,))]


def test_minilm_hidden_channel_reaches_the_model_output(minilm):
    _, graph = minilm
    group = channel_group(graph, "model.embeddings.word_embeddings", 7)
    assert group.slices[:3] == [ParamSlice(f"model.embeddings.{name}_embeddings.weight", 1, (7,))
                                for name in ("word", "token_type", "position")]
    assert ParamSlice("model.encoder.layer.5.output.LayerNorm.bias", 0, (7,)) in group.slices
    assert group.outputs and group.outputs[0].path == "output[0]" and group.outputs[0].indices == (7,)


# -- the digits CNN (conv-bn-relu x3, flatten, linear) ------------------------------------------
@pytest.fixture(scope="module")
def cnn(zoo_model):
    zoo = zoo_model("cnn-digits")
    return zoo, fxpress.capture(zoo.module, zoo.example_inputs)


def bn_slices(prefix: str, c: int) -> list[ParamSlice]:
    return [ParamSlice(f"{prefix}.{name}", 0, (c,)) for name in ("weight", "bias", "running_mean", "running_var")]


def test_cnn_conv_channel_couples_batchnorm_and_next_conv(cnn):
    zoo, graph = cnn
    assert channel_group(graph, "features.3", 3).slices == [
        ParamSlice("features.3.weight", 0, (3,)), *bn_slices("features.4", 3),
        ParamSlice("features.7.weight", 1, (3,))]
    assert_group_is_the_masked_channel(zoo.module, channel_group(graph, "features.3", 3).slices,
                                       masked(zoo.module, "features.5", 1, [3], before=False), zoo.example_inputs)


def test_cnn_last_conv_channel_couples_flattened_linear_columns(cnn):
    zoo, graph = cnn
    slices = channel_group(graph, "features.7", 3).slices
    assert slices == [ParamSlice("features.7.weight", 0, (3,)), *bn_slices("features.8", 3),
                      ParamSlice("classifier.0.weight", 1, (12, 13, 14, 15))]  # 64 x 2 x 2 flattened
    assert_group_is_the_masked_channel(zoo.module, slices, masked(zoo.module, "features.9", 1, [3], before=False),
                                       zoo.example_inputs)


# -- SmolLM2 (30 layers, 9 query / 3 KV heads of 64, MLP 1536) -----------------------------------
@pytest.mark.slow
def test_smollm2_mlp_channel_and_kv_head(zoo_model):
    zoo = zoo_model("smollm2")
    graph = fxpress.capture(zoo.module, zoo.example_inputs)
    assert channel_group(graph, f"{LAYER}.mlp.gate_proj", 700).slices == mlp_slices(LAYER, 700)
    for j in range(3):
        assert kv_head_group(graph, f"{LAYER}.self_attn", j).slices == kv_slices(LAYER, j, group=3, head_dim=64)
    assert head_group(graph, f"{LAYER}.self_attn", 4).slices == [
        rows(f"{LAYER}.self_attn.q_proj.weight", 256, 320), rows(f"{LAYER}.self_attn.o_proj.weight", 256, 320, 1)]
