"""share-weights: equality with a hand-tied eager model, unique vs executed params, one copy on disk."""
from __future__ import annotations

import copy

import pytest
import torch
from model_factories import tiny_llama, token_batches

import fxpress
from fxpress.errors import PipelineError
from fxpress.ir.verify import verify
from fxpress.passes import NumericCheck, PassContext, PassManager, VerifyAfterPass, parse_pipeline
from fxpress.analysis.blocks import find_blocks
from fxpress.passes.depth.share_weights import ShareWeights, executed_params
from fxpress.export.hf import load_weights, save_weights

NON_NORM = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(layers=5)
    return model, fxpress.capture(model, token_batches(1, seed=0)[0])


def tied_by_hand(model: torch.nn.Module, groups: list[list[int]], policy: str = "first") -> torch.nn.Module:
    """Eager reference: layers of a group use the first layer's linear modules (or their mean); norms untouched."""
    tied = copy.deepcopy(model)
    layers = tied.model.model.layers
    for group in groups:
        for name in NON_NORM:
            owner = layers[group[0]].get_submodule(name)
            if policy == "mean":
                mean = torch.stack([layers[i].get_submodule(name).weight.detach() for i in group]).mean(0)
                owner.weight = torch.nn.Parameter(mean)
            for i in group[1:]:
                parent, _, leaf = name.rpartition(".")
                setattr(layers[i].get_submodule(parent), leaf, owner)
    return tied.eval()


@pytest.mark.parametrize("policy", ["first", "mean"])
def test_sharing_matches_hand_tied_model(llama, policy):
    model, graph = llama
    result = PassManager(f"share-weights{{group=2,policy={policy}}}", [VerifyAfterPass(), NumericCheck()]).run(
        graph, PassContext(calibration=token_batches(2)))
    shared = result.graph
    (ids,) = token_batches(1, seed=4)[0]
    with torch.no_grad():
        expected = tied_by_hand(model, [[0, 1], [2, 3]], policy)(ids)
    torch.testing.assert_close(shared(ids), expected, rtol=1e-5, atol=1e-5)
    stats = result.reports[0].stats
    assert stats["groups"] == [["model.model.layers.0", "model.model.layers.1"],
                               ["model.model.layers.2", "model.model.layers.3"]]
    assert stats["executed_params"] == stats["executed_params_before"] > stats["unique_params_before"]
    assert stats["unique_params"] < stats["unique_params_before"] == graph.num_params


def test_unique_block_params_halve_and_norms_stay(llama):
    model, graph = llama
    shared = ShareWeights(group=2)(graph, PassContext()).graph
    verify(shared)
    layer = model.model.model.layers[0]
    linear = sum(layer.get_submodule(n).weight.numel() for n in NON_NORM)
    assert graph.num_params - shared.num_params == 2 * linear  # layers 1 and 3 read layers 0 and 2
    assert executed_params(shared) == executed_params(graph)
    norms = [str(n.target) for n in shared.fx.nodes if n.op == "get_attr" and "layernorm" in str(n.target)]
    assert len(set(norms)) == 2 * 5  # two norms per block, none shared
    assert len(find_blocks(shared)) == 5  # blocks reading another block's weights are still blocks


def test_saved_weights_store_shared_tensors_once(llama, tmp_path):
    _, graph = llama
    shared = ShareWeights(group=2)(graph, PassContext()).graph
    size_original = save_weights(graph, tmp_path / "original.safetensors")
    size_shared = save_weights(shared, tmp_path / "shared.safetensors")
    bytes_removed = (graph.num_params - shared.num_params) * 4
    assert bytes_removed <= size_original - size_shared <= bytes_removed * 1.05  # + the header's alias list
    loaded = load_weights(tmp_path / "shared.safetensors")
    assert loaded["model.lm_head.weight"] is not None
    reads = {str(n.target) for n in shared.fx.nodes if n.op == "get_attr"}
    assert reads <= set(loaded)


def test_second_run_and_group_one_do_nothing(llama):
    _, graph = llama
    once = ShareWeights(group=2)(graph, PassContext()).graph
    assert ShareWeights(group=2)(once, PassContext()).modified is False
    assert ShareWeights(group=1)(graph, PassContext()).modified is False


def test_bad_group_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="group must be >= 1"):
        parse_pipeline("share-weights{group=0}")
    assert str(parse_pipeline("share-weights{group=3,policy=mean}")[0]) == "share-weights{group=3,policy=mean}"
