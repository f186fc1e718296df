"""The compressed graph as a Hugging Face folder: transformers reloads it with the graph's outputs."""
from __future__ import annotations

import json

import pytest
import torch
from model_factories import skip_layers, tiny_llama, token_batches

import fxpress
from fxpress.errors import ArtifactError
from fxpress.passes import PassContext, PassManager
from fxpress.analysis.blocks import find_blocks
from fxpress.export.hf import export_hf, load_hf


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(layers=5)
    return model, fxpress.capture(model, token_batches(1, seed=0)[0])


def test_removed_and_shared_llama_reloads_with_equal_outputs(llama, tmp_path):
    from transformers import LlamaForCausalLM

    model, graph = llama
    ctx = PassContext(calibration=token_batches(2), teacher=graph)
    compressed = PassManager("remove-layers{count=2,metric=last},share-weights{group=2},"
                             "distill{steps=2,lr=0.001,tail=1}").run(graph, ctx).graph
    export_hf(compressed, model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    reloaded = load_hf(tmp_path, LlamaForCausalLM)
    (ids,) = token_batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, compressed(ids),
                                   rtol=1e-5, atol=1e-5)


def test_export_without_changes_matches_original(llama, tmp_path):
    from transformers import LlamaForCausalLM

    model, graph = llama
    export_hf(graph, model, tmp_path)
    reloaded = load_hf(tmp_path, LlamaForCausalLM)
    (ids,) = token_batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, use_cache=False).logits, model(ids))


def test_export_needs_a_transformers_model():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    graph = fxpress.capture(plain, (torch.randn(2, 4),))
    with pytest.raises(ArtifactError, match="no transformers PreTrainedModel"):
        export_hf(graph, plain, "unused")


@pytest.fixture(scope="module")
def minilm(zoo_model):
    zoo = zoo_model("minilm")
    return zoo, fxpress.capture(zoo.module, zoo.example_inputs)


def test_minilm_blocks_removal_exact_and_export(minilm, tmp_path):
    from transformers import BertModel

    zoo, graph = minilm
    stack = find_blocks(graph)
    assert stack.paths == [f"model.encoder.layer.{i}" for i in range(6)] and len(stack.side_inputs) == 1
    ctx = PassContext(calibration=[zoo.example_inputs], teacher=graph)
    assert PassManager("remove-layers{count=0}").run(graph, ctx).graph is graph
    result = PassManager("remove-layers{count=2,metric=angular}").run(graph, ctx)
    removed = [int(p.rsplit(".", 1)[1]) for p in result.reports[0].stats["removed"]]
    with torch.no_grad():
        expected = skip_layers(zoo.module, removed)(*zoo.example_inputs)
    torch.testing.assert_close(result.graph(*zoo.example_inputs), expected, rtol=1e-5, atol=1e-5)
    export_hf(result.graph, zoo.module, tmp_path)
    reloaded = load_hf(tmp_path, BertModel)
    assert reloaded.config.num_hidden_layers == 4
    ids, mask = zoo.example_inputs
    with torch.no_grad():
        out = reloaded(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_minilm_sharing_matches_hand_tied_encoder(minilm):
    import copy

    zoo, graph = minilm
    shared = PassManager("share-weights{group=2}").run(graph).graph
    tied = copy.deepcopy(zoo.module)
    layers = tied.model.encoder.layer
    for first in (0, 2, 4):
        owner, follower = layers[first], layers[first + 1]
        follower.attention.self.query = owner.attention.self.query
        follower.attention.self.key = owner.attention.self.key
        follower.attention.self.value = owner.attention.self.value
        follower.attention.output.dense = owner.attention.output.dense
        follower.intermediate.dense = owner.intermediate.dense
        follower.output.dense = owner.output.dense
    with torch.no_grad():
        torch.testing.assert_close(shared(*zoo.example_inputs), tied(*zoo.example_inputs), rtol=1e-5, atol=1e-5)
