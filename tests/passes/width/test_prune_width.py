"""prune-width: structured width pruning through the dimension flow, checked against the eager model.

Removing a query head equals zeroing its columns of o_proj in the eager model; removing an MLP neuron
equals zeroing its column of down_proj; a key/value head goes with every query head that reads it.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factories import VOCAB, token_batches

import fxpress
from fxpress.errors import OptionError, PreconditionError
from fxpress.export.hf import export_hf, load_hf
from fxpress.passes import PassContext, PassManager, VerifyAfterPass

torch.set_num_threads(1)
LAYERS = "model.model.layers"


def llama(heads: int = 4, kv_heads: int = 2, head_dim: int = 8, layers: int = 2, seed: int = 0,
          hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fxpress.zoo import CausalLMLogits

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return CausalLMLogits(LlamaForCausalLM(config)).eval()


def run(graph, pipeline: str, batches):
    return PassManager(pipeline, [VerifyAfterPass()]).run(graph, PassContext(calibration=list(batches)))


def zeroed_heads(model, removed: dict[int, list[int]], head_dim: int):
    """The eager model with the given query heads' o_proj columns zeroed, per layer."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads in removed.items():
            weight = copied.model.model.layers[layer].self_attn.o_proj.weight
            for h in heads:
                weight[:, h * head_dim:(h + 1) * head_dim] = 0
    return copied


def kept_rows(old: torch.Tensor, new: torch.Tensor) -> list[int]:
    """Which rows of `old` the rows of `new` are (pruning keeps rows in order)."""
    return [next(i for i in range(old.shape[0]) if torch.equal(old[i], row)) for row in new]


@pytest.fixture(scope="module")
def tiny():
    model = llama(layers=2)
    batches = token_batches(2)
    return model, fxpress.capture(model, batches[0]), batches


def test_keeping_every_unit_is_exact_and_says_so(tiny):
    model, graph, batches = tiny
    result = run(graph, "prune-width{heads=4,kv_heads=2,mlp=48}", batches)
    report = result.reports[-1]
    assert not report.modified and "keeps every unit" in report.stats["reason"]
    assert result.graph is graph
    empty = run(graph, "prune-width", batches).reports[-1]
    assert not empty.modified and "no target" in empty.stats["reason"]


def test_removed_heads_equal_zeroed_heads_in_eager(tiny):
    model, graph, batches = tiny
    result = run(graph, "prune-width{heads=2}", batches)
    layers = result.reports[-1].stats["layers"]
    removed = {int(path.rsplit(".", 1)[1]): entry["removed_heads"] for path, entry in layers.items()}
    assert all(len(h) == 2 for h in removed.values()) and layers[f"{LAYERS}.0"]["heads"] == "4->2"
    # within groups: each of the two KV heads keeps one of its two query heads
    assert all(sorted(h // 2 for h in heads) == [0, 1] for heads in removed.values())
    reference = zeroed_heads(model, removed, 8)
    x = token_batches(1, seed=7)[0]
    torch.testing.assert_close(result.graph(*x), reference(*x), rtol=1e-5, atol=1e-5)
    q = result.graph.attribute(f"{LAYERS}.0.self_attn.q_proj.weight")
    assert tuple(q.shape) == (16, 32) and graph.attribute(f"{LAYERS}.0.self_attn.q_proj.weight").shape[0] == 32


def test_removed_neurons_equal_zeroed_down_proj_columns(tiny):
    model, graph, batches = tiny
    result = run(graph, "prune-width{mlp=30,importance=contribution,aggregation=l2}", batches)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in range(2):
            old = graph.attribute(f"{LAYERS}.{layer}.mlp.up_proj.weight")
            new = result.graph.attribute(f"{LAYERS}.{layer}.mlp.up_proj.weight")
            keep = kept_rows(old, new)
            assert len(keep) == 30 and keep == sorted(keep)
            gone = [i for i in range(48) if i not in keep]
            reference.model.model.layers[layer].mlp.down_proj.weight[:, gone] = 0
    x = token_batches(1, seed=7)[0]
    torch.testing.assert_close(result.graph(*x), reference(*x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("importance", ["activation", "contribution", "taylor", "magnitude", "random"])
def test_every_importance_prunes_and_keeps_the_input_graph(tiny, importance):
    model, graph, batches = tiny
    before = {k: v.clone() for k, v in graph.referenced_tensors().items()}
    result = run(graph, f"prune-width{{heads=2,kv_heads=1,mlp=24,importance={importance}}}", batches)
    stats = result.reports[-1].stats
    assert stats["layers"][f"{LAYERS}.1"] == {**stats["layers"][f"{LAYERS}.1"], "heads": "4->2", "kv_heads": "2->1",
                                              "mlp": "48->24"}
    assert result.graph.num_params < graph.num_params and stats["removed_params"] > 0
    assert all(torch.equal(graph.referenced_tensors()[k], v) for k, v in before.items())


def test_importance_is_better_than_chance_on_a_planted_neuron(tiny):
    """A neuron made dominant (large down_proj column) must survive activation, contribution and magnitude."""
    model, _, batches = tiny
    planted = copy.deepcopy(model)
    with torch.no_grad():
        mlp = planted.model.model.layers[0].mlp
        mlp.up_proj.weight[5] *= 20
        mlp.down_proj.weight[:, 5] *= 20
    graph = fxpress.capture(planted, batches[0])
    for importance in ("activation", "contribution", "magnitude", "taylor"):
        result = run(graph, f"prune-width{{mlp=4,importance={importance}}}", batches)
        new = result.graph.attribute(f"{LAYERS}.0.mlp.up_proj.weight")
        assert 5 in kept_rows(graph.attribute(f"{LAYERS}.0.mlp.up_proj.weight"), new), importance


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv=st.integers(1, 3), group=st.integers(1, 3), data=st.data())
def test_grouped_query_heads_stay_consistent(kv, group, data):
    heads = kv * group
    if heads < 2:
        return  # a single head has nothing to prune (a PreconditionError says so)
    kv_keep = data.draw(st.integers(1, kv))
    per_group = data.draw(st.integers(1, group))
    model = llama(heads=heads, kv_heads=kv, head_dim=4, layers=2, hidden=4 * heads)
    batches = token_batches(1)
    graph = fxpress.capture(model, batches[0])
    grouped = kv < heads
    pipeline = (f"prune-width{{heads={kv_keep * per_group},kv_heads={kv_keep}}}" if grouped
                else f"prune-width{{heads={kv_keep}}}")
    result = run(graph, pipeline, batches)
    heads_kept = kv_keep * per_group if grouped else kv_keep
    kv_kept = kv_keep if grouped else kv_keep
    attention = f"{LAYERS}.0.self_attn"
    if result.reports[-1].modified:
        assert result.graph.attribute(f"{attention}.q_proj.weight").shape[0] == heads_kept * 4
        assert result.graph.attribute(f"{attention}.k_proj.weight").shape[0] == kv_kept * 4
        layers = result.reports[-1].stats["layers"]
        removed = {layer: layers[f"{LAYERS}.{layer}"]["removed_heads"] for layer in range(2)}
        assert all(len(r) == heads - heads_kept for r in removed.values())
        reference = zeroed_heads(model, removed, 4)
        x = token_batches(1, seed=3)[0]
        torch.testing.assert_close(result.graph(*x), reference(*x), rtol=1e-5, atol=1e-5)
    else:
        assert heads_kept == heads and kv_kept == kv


def test_hidden_channels_and_hf_export_reload_with_equal_outputs(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    model, graph, batches = tiny
    result = run(graph, "prune-width{heads=2,kv_heads=1,mlp=32,embed=24}", batches)
    assert result.reports[-1].stats["embed"] == "32->24"
    folder = export_hf(result.graph, model, tmp_path / "pruned")
    reloaded = load_hf(folder, LlamaForCausalLM)
    config = reloaded.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (24, 32, 2, 1, 8)
    x = token_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x[0]).logits, result.graph(*x), rtol=1e-5, atol=1e-5)


def test_bad_input_gets_one_clear_error(tiny):
    model, graph, batches = tiny
    with pytest.raises(OptionError, match="heads is a count to keep"):
        PassManager("prune-width{heads=0}")
    with pytest.raises(PreconditionError, match="cannot be split evenly over 2 kept key/value heads"):
        run(graph, "prune-width{heads=3}", batches)
    with pytest.raises(PreconditionError, match="heads=5 exceeds the 4 query heads"):
        run(graph, "prune-width{heads=5}", batches)
    with pytest.raises(PreconditionError, match="kv_heads=3 exceeds"):
        run(graph, "prune-width{kv_heads=3}", batches)
    with pytest.raises(PreconditionError, match="mlp keep count 99 exceeds"):
        run(graph, "prune-width{mlp=99}", batches)
    with pytest.raises(PreconditionError, match="needs calibration"):
        PassManager("prune-width{mlp=8,importance=taylor}").run(graph, PassContext())


def test_hidden_channels_that_reach_the_output_are_refused():
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 16)
            self.fc = nn.Linear(16, 16)

        def forward(self, ids):
            x = self.embed(ids)
            return x + self.fc(x)

    graph = fxpress.capture(Encoder(), token_batches(1)[0])
    with pytest.raises(PreconditionError, match="reach the graph output"):
        run(graph, "prune-width{embed=8}", token_batches(1))
