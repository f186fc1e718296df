"""remove-layers: metrics, exactness against eager models with blocks skipped, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factories import VOCAB, skip_layers, tiny_llama, token_batches

import fxpress
from fxpress.errors import PassError, PipelineError, PreconditionError
from fxpress.ir.verify import verify
from fxpress.passes import NumericCheck, PassContext, PassManager, VerifyAfterPass, parse_pipeline
from fxpress.analysis.blocks import find_blocks
from fxpress.passes.depth.remove_layers import RemoveLayers, block_scores, choose_removals
from fxpress.zoo import load_dataset

METRICS = ("angular", "cosine", "ppl", "gate", "last", "random")


@pytest.fixture(scope="module")
def llama():
    """Tiny LLaMA (6 layers) whose layer 3 adds nothing to the residual stream (its output projections are 0)."""
    model = tiny_llama(layers=6)
    layer = model.model.model.layers[3]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return model, fxpress.capture(model, token_batches(1, seed=0)[0])


@pytest.fixture(scope="module")
def ctx():
    return PassContext(calibration=token_batches(3), seed=0)


def test_removing_zero_blocks_is_exact(llama, ctx):
    _, graph = llama
    for pass_ in (RemoveLayers(count=0), RemoveLayers(ratio=0.0), RemoveLayers(ratio=0.05)):
        result = pass_(graph, ctx)
        assert result.modified is False and result.graph is graph


@pytest.fixture(scope="module")
def vit(zoo_model):
    """The trained vit-mnist with block 2 made an identity (its output projections zeroed)."""
    zoo = zoo_model("vit-mnist")
    model = copy.deepcopy(zoo.module)
    block = model.blocks[2]
    with torch.no_grad():
        for layer in (block.attn.proj, block.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
    images = load_dataset("mnist-5k", "train").images
    calibration = [(images[i * 8:(i + 1) * 8],) for i in range(3)]
    return fxpress.capture(model, calibration[0]), PassContext(calibration=calibration)


@pytest.mark.parametrize("metric", ["angular", "cosine", "ppl", "gate"])
def test_metrics_find_the_identity_block(vit, metric):
    graph, ctx = vit
    result = PassManager(f"remove-layers{{count=1,metric={metric},gate_steps=8}}",
                         [VerifyAfterPass(), NumericCheck()]).run(graph, ctx)
    report = result.reports[0]
    assert report.stats["removed"] == ["blocks.2"]
    assert report.error["max_abs"] < 1e-4  # the removed block was an identity
    assert report.after["params"] < report.before["params"]


def test_ppl_scores_are_loss_increases_when_skipping(llama, ctx):
    model, graph = llama
    stack = find_blocks(graph)
    scores = block_scores(graph, stack, "ppl", ctx)
    assert abs(scores[3]) < 1e-6  # layer 3 is an identity

    def loss(fn):
        total = 0.0
        for (ids,) in ctx.calibration:
            logits = fn(ids)
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))
        return total / len(ctx.calibration)

    with torch.no_grad():
        expected = loss(skip_layers(model, [1])) - loss(model)
    assert scores[1] == pytest.approx(expected, abs=1e-5)


def test_removal_matches_eager_model_without_those_blocks(llama, ctx):
    model, graph = llama
    result = RemoveLayers(count=3, metric="ppl")(graph, ctx)
    removed = [int(p.rsplit(".", 1)[1]) for p in result.stats["removed"]]
    assert len(removed) == 3 and 3 in removed
    verify(result.graph)
    (ids,) = token_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(result.graph(ids), skip_layers(model, removed)(ids), rtol=1e-5, atol=1e-5)
    assert len(find_blocks(result.graph)) == 3


def test_baselines_and_protected_ends(llama, ctx):
    _, graph = llama
    stack = find_blocks(graph)
    assert choose_removals(block_scores(graph, stack, "last", ctx), 2) == [4, 5]
    assert choose_removals(block_scores(graph, stack, "last", ctx), 2, keep_last=1) == [3, 4]
    random_a = block_scores(graph, stack, "random", ctx)
    assert random_a == block_scores(graph, stack, "random", PassContext(seed=0))
    assert random_a != block_scores(graph, stack, "random", PassContext(seed=3))
    removed = RemoveLayers(count=2, metric="angular", keep_first=4)(graph, ctx).stats["removed"]
    assert removed == ["model.model.layers.4", "model.model.layers.5"]


def test_every_metric_round_trips_as_text():
    for metric in METRICS:
        text = f"remove-layers{{ratio=0.25,count=None,metric={metric},keep_first=1,keep_last=0,max_batches=8,gate_steps=20}}"
        assert str(parse_pipeline(text)[0]) == text


@pytest.mark.parametrize("text", ["remove-layers{ratio=1.0}", "remove-layers{ratio=-0.1}",
                                  "remove-layers{ratio=0.2,count=1}", "remove-layers{metric=size}"])
def test_bad_options_are_pipeline_errors(text):
    with pytest.raises(PipelineError):
        parse_pipeline(text)


def test_count_must_leave_a_block(llama, ctx):
    _, graph = llama
    with pytest.raises(PreconditionError, match="count=6 must be less than the number of blocks"):
        PassManager("remove-layers{count=6}").run(graph, ctx)
    with pytest.raises(PassError, match="only 2 may go"):
        PassManager("remove-layers{count=3,keep_first=2,keep_last=2}").run(graph, ctx)


@pytest.mark.parametrize("metric", ["ppl", "gate"])
def test_calibration_metrics_need_calibration(llama, metric):
    _, graph = llama
    with pytest.raises(PreconditionError, match="needs calibration data"):
        RemoveLayers(count=1, metric=metric)(graph, PassContext())


def test_input_graph_untouched_and_idempotent_per_count(llama, ctx):
    _, graph = llama
    before = graph.module.code
    once = PassManager("remove-layers{count=2,metric=angular}").run(graph, ctx).graph
    assert graph.module.code == before
    again = RemoveLayers(count=0)(once, ctx)
    assert again.modified is False


@pytest.mark.slow
def test_smollm2_decoder_layers_removed_exactly(zoo_model):
    zoo = zoo_model("smollm2")
    (ids,) = zoo.example_inputs
    graph = fxpress.capture(zoo.module, (ids,))
    stack = find_blocks(graph)
    assert stack.paths == [f"model.model.layers.{i}" for i in range(30)] and len(stack.side_inputs) == 3
    result = RemoveLayers(count=3, metric="angular")(graph, PassContext(calibration=[(ids,)]))
    removed = [int(p.rsplit(".", 1)[1]) for p in result.stats["removed"]]
    assert 0 not in removed  # the first layer rewrites the embedding most
    with torch.no_grad():
        expected = skip_layers(zoo.module, removed)(ids)
    torch.testing.assert_close(result.graph(ids), expected, rtol=1e-4, atol=1e-4)
    assert result.graph.num_params < graph.num_params


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(0, 5), metric=st.sampled_from(["last", "random", "angular"]), seed=st.integers(0, 3))
def test_property_blocks_left_and_params_never_grow(llama, count, metric, seed):
    _, graph = llama
    result = RemoveLayers(count=count, metric=metric)(graph, PassContext(calibration=token_batches(1), seed=seed))
    assert len(find_blocks(result.graph) or ()) == 6 - count or count == 5  # one block left is not a stack
    assert result.graph.num_params <= graph.num_params
    assert result.modified == (count > 0)
    verify(result.graph, check_shapes=False)
