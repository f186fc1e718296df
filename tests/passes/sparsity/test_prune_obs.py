"""prune-obs: exact at sparsity 0, uniform per-layer sparsity with masks, masks survive distill, gradual
schedule, tied weights stay tied, and one clear error per bad input."""
from __future__ import annotations

import pytest
import torch
from model_factories import PlainMlp, snapshot, token_batches, unchanged
from torch import nn

import fxpress
import fxpress.passes.sparsity.prune_obs  # noqa: F401  (registers prune-obs)
from fxpress.errors import OptionError, PipelineError, PreconditionError
from fxpress.passes import PassContext, PassManager, VerifyAfterPass, parse_pipeline
from fxpress.passes.depth.share_weights import ShareWeights
from fxpress.passes.sparsity.prune_obs import PruneObs, cubic_sparsity

torch.set_num_threads(1)

Q0 = "model.model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def llama(tiny_llama_graph):
    model, graph = tiny_llama_graph
    return model, graph, token_batches(8)


def Mlp() -> nn.Module:
    """No residual blocks; a 6-output layer (not a multiple of 4) and a 30-weight layer."""
    return PlainMlp(8, 6, 5)


@pytest.fixture(scope="module")
def mlp():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    return fxpress.capture(Mlp(), (x,)), [(x + 0.1 * i,) for i in range(4)]


def test_zero_sparsity_is_exact(llama):
    _, graph, batches = llama
    ctx = PassContext(calibration=batches)
    result = PassManager("prune-obs{sparsity=0}", [VerifyAfterPass()]).run(graph, ctx)
    assert result.graph is graph and result.reports[0].modified is False
    assert "sparsity=0" in result.reports[0].stats["reason"]
    torch.testing.assert_close(result.graph(*batches[0]), graph(*batches[0]), rtol=0, atol=0)


@pytest.mark.parametrize("options", ["score=obs", "score=obs,update=true", "score=obs,hessian=layerwise,update=true",
                                     "score=fisher-diag", "score=magnitude", "block=4x1", "block=1x4,fisher_block=8"])
def test_every_layer_gets_its_sparsity_and_a_mask(llama, options):
    model, graph, batches = llama
    before = snapshot(model)
    result = PassManager(f"prune-obs{{sparsity=0.5,{options}}}", [VerifyAfterPass()]).run(
        graph, PassContext(calibration=batches))
    pruned, stats = result.graph, result.reports[0].stats
    assert stats["layers"] == 28 and stats["sparsity"] == 0.5  # 7 linears in each of 4 blocks, not the head
    assert all(entry["sparsity"] == 0.5 for entry in stats["per_layer"].values())
    assert set(pruned.masks) == set(stats["per_layer"])
    for path, keep in pruned.masks.items():
        weight = pruned.attribute(path)
        assert torch.equal(weight == 0, ~keep) and weight is not graph.attribute(path)
        if "update" not in options:
            torch.testing.assert_close(weight, graph.attribute(path) * keep, rtol=0, atol=0)
    assert pruned.attribute("model.lm_head.weight") is graph.attribute("model.lm_head.weight")
    assert unchanged(model, before) and not graph.masks
    assert pruned.num_params == graph.num_params


def test_groups_of_four_go_together(llama):
    _, graph, batches = llama
    for block, dim in (("4x1", 0), ("1x4", 1)):
        pruned = PruneObs(sparsity=0.5, block=block)(graph, PassContext(calibration=batches)).graph
        keep = pruned.masks[Q0]
        groups = keep.unflatten(dim, (-1, 4))
        assert torch.equal(groups.all(dim + 1), groups.any(dim + 1))


def test_masks_survive_distill(llama):
    _, graph, batches = llama
    ctx = PassContext(calibration=batches, teacher=graph)
    result = PassManager("prune-obs{sparsity=0.6},distill{steps=3,lr=0.001}", [VerifyAfterPass()]).run(graph, ctx)
    distilled = result.graph
    assert result.reports[1].stats["masked_params"] == 28
    for path, keep in distilled.masks.items():
        weight = distilled.attribute(path)
        assert torch.equal(weight[~keep], torch.zeros(int((~keep).sum())))
    assert not torch.equal(distilled.attribute(Q0), graph.attribute(Q0) * distilled.masks[Q0])  # it trained


def test_gradual_schedule_prunes_in_cubic_steps_with_distillation(llama):
    _, graph, batches = llama
    result = PruneObs(sparsity=0.5, schedule="gradual", steps=2, distill_steps=2)(
        graph, PassContext(calibration=batches, teacher=graph))
    steps = result.stats["steps"]
    assert [s["sparsity"] for s in steps] == [round(cubic_sparsity(0.5, t, 2), 4) for t in (1, 2)] == [0.4375, 0.5]
    assert all("distill_loss" in s for s in steps) and result.stats["sparsity"] == 0.5
    for path, keep in result.graph.masks.items():
        assert torch.equal(result.graph.attribute(path) == 0, ~keep)
    with pytest.raises(PreconditionError, match="needs a teacher"):
        PruneObs(sparsity=0.5, schedule="gradual")(graph, PassContext(calibration=batches))


def test_shared_weights_are_pruned_once_for_all_their_uses(llama):
    _, graph, batches = llama
    shared = ShareWeights(group=2)(graph, PassContext()).graph  # layer 1 reads layer 0's tensors
    for options in ({}, {"hessian": "layerwise", "update": True}):
        result = PruneObs(sparsity=0.5, **options)(shared, PassContext(calibration=batches))
        assert result.stats["layers"] == 14 and set(result.graph.masks) == set(result.stats["per_layer"])
        assert result.graph.num_params == shared.num_params
        assert result.stats["per_layer"][Q0]["sparsity"] == 0.5


def test_magnitude_needs_no_data_and_pipeline_text_round_trips(llama):
    _, graph, _ = llama
    magnitude = PruneObs(sparsity=0.3, score="magnitude")(graph, PassContext())
    assert magnitude.stats["sparsity"] == pytest.approx(0.3, abs=1e-3)
    p = PruneObs(sparsity=0.7, block="4x1", damp=0.1, layers=("*.mlp.*", "*.o_proj"))
    assert parse_pipeline(str(p)) == [p]
    only = PruneObs(sparsity=0.5, score="magnitude", layers=("*.mlp.*",))(graph, PassContext())
    assert only.stats["layers"] == 12


def test_encoder_outputs_need_a_task_loss(mlp):
    graph, batches = mlp
    ctx = PassContext(calibration=batches)
    with pytest.raises(PreconditionError, match=r"PassContext\(loss=\.\.\.\).*score=magnitude or hessian=layerwise"):
        PruneObs(sparsity=0.5, hessian="fisher", fisher_block=2, layers=("fc1",))(graph, ctx)
    assert PruneObs(sparsity=0.5, hessian="layerwise", layers=("fc1",))(graph, ctx).stats["sparsity"] == 0.5
    with_loss = PassContext(calibration=batches, loss=lambda out, batch: (out ** 2).mean())
    assert PruneObs(sparsity=0.5, fisher_block=2, layers=("fc1",))(graph, with_loss).stats["sparsity"] == 0.5


def test_without_blocks_there_is_nothing_to_do_by_default(mlp):
    graph, batches = mlp
    result = PruneObs(sparsity=0.5)(graph, PassContext(calibration=batches))
    assert result.modified is False and "layers=" in result.stats["reason"]


def test_bad_inputs_each_get_one_clear_error(llama, mlp):
    _, graph, _ = llama
    small, batches = mlp
    with pytest.raises(OptionError, match=r"sparsity must be in \[0, 1\)"):
        PruneObs(sparsity=1.0)
    with pytest.raises(PipelineError, match="choose one of 1, 4x1, 1x4"):
        parse_pipeline("prune-obs{block=2x2}")
    with pytest.raises(OptionError, match="fisher_block=6 must be a positive multiple of the 4 weights"):
        PruneObs(block="1x4", fisher_block=6)
    with pytest.raises(PreconditionError, match="needs calibration data"):
        PruneObs(sparsity=0.5)(graph, PassContext())
    with pytest.raises(PreconditionError, match=r"block=4x1 .* 6 outputs .*: fc1.weight \(node linear"):
        PruneObs(sparsity=0.5, block="4x1", score="magnitude", layers=("fc1",))(small, PassContext())
    with pytest.raises(PreconditionError, match="fisher_block=16 does not divide the 30 weights of fc2.weight"):
        PruneObs(sparsity=0.5, hessian="fisher", layers=("fc2",))(small, PassContext(calibration=batches))
    with pytest.raises(PreconditionError, match="layers=nothing.* matches no linear weight"):
        PruneObs(sparsity=0.5, score="magnitude", layers=("nothing.*",))(small, PassContext())
