"""Residual block discovery (fxpress.analysis.blocks) and the block runner, on a tiny random LLaMA and zoo models."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import fxpress
from model_factories import skip_layers, token_batches
from fxpress.ir.verify import verify
from fxpress.passes import PassContext
from fxpress.analysis.blocks import BlockRunner, find_block_stacks, find_blocks, remove_blocks
from fxpress.passes.depth.remove_layers import RemoveLayers
from fxpress.passes.depth.share_weights import ShareWeights
from fxpress.analysis.attention import find_transformer_blocks


@pytest.fixture(scope="module")
def llama(tiny_llama_graph):
    return tiny_llama_graph


def test_finds_decoder_layers_with_side_inputs(llama):
    _, graph = llama
    stack = find_blocks(graph)
    assert stack.prefix == "model.model.layers"
    assert stack.paths == [f"model.model.layers.{i}" for i in range(4)]
    assert [b.label for b in stack.blocks] == [0, 1, 2, 3]
    assert len(stack.side_inputs) == 3  # attention mask, rotary cos, rotary sin
    assert stack.blocks[0].input == "embedding"
    assert all(b.input == a.output for a, b in zip(stack.blocks, stack.blocks[1:]))
    assert all(p.startswith(b.path + ".") for b in stack.blocks for p in b.params)


def test_agrees_with_transformer_block_outputs(llama):
    _, graph = llama
    ours = [b.output for b in find_blocks(graph).blocks]
    assert ours == [b.output.name for b in find_transformer_blocks(graph)]


def test_runner_records_and_reproduces_outputs(llama):
    _, graph = llama
    stack = find_blocks(graph)
    (ids,) = token_batches(1, seed=5)[0]
    runner = BlockRunner(graph, stack, record=True)
    with torch.no_grad():
        assert torch.equal(runner(ids), graph(ids))
    assert sorted(runner.inputs) == [0, 1, 2, 3]
    assert torch.equal(runner.inputs[2], runner.outputs[1])


def test_resumed_skip_run_equals_full_skip_run(llama):
    _, graph = llama
    stack = find_blocks(graph)
    (ids,) = token_batches(1, seed=6)[0]
    with torch.no_grad():
        recorder = BlockRunner(graph, stack, record=True)
        recorder(ids)
        for position in range(4):
            resumed = BlockRunner(graph, stack, skip=[position]).resume(position, recorder.skeleton,
                                                                       recorder.inputs[position])
            assert torch.equal(resumed, BlockRunner(graph, stack, skip=[position])(ids))


def test_remove_blocks_matches_eager_model_without_them(llama):
    model, graph = llama
    stack = find_blocks(graph)
    new = graph.copy()
    assert remove_blocks(new, stack, [2, 1]) == ["model.model.layers.1", "model.model.layers.2"]
    new.recompile()
    verify(new)
    (ids,) = token_batches(1, seed=7)[0]
    with torch.no_grad():
        expected = skip_layers(model, [1, 2])(ids)
    torch.testing.assert_close(new(ids), expected, rtol=1e-5, atol=1e-5)
    assert find_blocks(new).paths == ["model.model.layers.0", "model.model.layers.3"]


class Plain(nn.Module):
    """Numbered modules that are not residual (shapes change), and no repeated blocks at all."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        return self.layers(x)


def test_no_repeated_blocks_is_nothing_to_do():
    graph = fxpress.capture(Plain(), (torch.randn(2, 4),))
    assert find_block_stacks(graph) == []
    ctx = PassContext(calibration=[(torch.randn(2, 4),)])
    for pass_ in (RemoveLayers(ratio=0.5), ShareWeights(group=2)):
        result = pass_(graph, ctx)
        assert result.modified is False and result.graph is graph
        assert "no repeated residual blocks" in result.stats["reason"]


def test_finds_vit_blocks(zoo_model):
    vit = zoo_model("vit-mnist")
    graph = fxpress.capture(vit.module, vit.example_inputs)
    stack = find_blocks(graph)
    assert stack.paths == [f"blocks.{i}" for i in range(4)] and stack.side_inputs == ()


def test_attention_pattern_is_the_fallback_and_the_annotation(zoo_model):
    """Module paths first, each block naming its attention core; without module paths, the attention
    pattern's blocks, which remove the same computation."""
    model = zoo_model("vit-mnist")
    graph = fxpress.capture(model.module, model.example_inputs)
    (stack,) = find_block_stacks(graph)
    assert stack.prefix == "blocks" and [b.attention for b in stack.blocks] == [
        "softmax", "softmax_1", "softmax_2", "softmax_3"]
    pathless = graph.copy()
    for node in pathless.fx.nodes:
        node.meta.pop("nn_module_stack", None)
    pathless.annotate()
    (fallback,) = find_block_stacks(pathless)
    assert fallback.prefix == "<attention pattern>" and len(fallback) == 4
    assert [b.input for b in fallback.blocks] == [b.input for b in stack.blocks]
    by_path, by_pattern = graph.copy(), pathless.copy()
    remove_blocks(by_path, stack, [2])
    remove_blocks(by_pattern, fallback, [2])
    inputs = model.example_inputs
    assert torch.equal(by_path.recompile()(*inputs), by_pattern.recompile()(*inputs))
