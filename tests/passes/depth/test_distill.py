"""distill: needs a teacher and calibration; moves the student towards the teacher; never writes the input."""
from __future__ import annotations

import pytest
import torch
from model_factories import tiny_llama, token_batches

import fxpress
from fxpress.errors import PipelineError, PreconditionError
from fxpress.passes import PassContext, PassManager, VerifyAfterPass, parse_pipeline
from fxpress.passes.depth.distill import Distill, output_kd
from fxpress.passes.depth.remove_layers import RemoveLayers
from fxpress.passes.depth.share_weights import ShareWeights


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(layers=4)
    graph = fxpress.capture(model, token_batches(1, seed=0)[0])
    calibration = token_batches(8)
    pruned = RemoveLayers(count=1, metric="last")(graph, PassContext()).graph
    return model, graph, pruned, calibration


def kd_to_teacher(student: fxpress.Graph, teacher: fxpress.Graph, batches: list) -> float:
    return sum(float(output_kd(student(*b), teacher(*b), b)) for b in batches) / len(batches)


@pytest.mark.parametrize("tail", [0, 2])
def test_distillation_moves_the_student_towards_the_teacher(setup, tail):
    _, graph, pruned, calibration = setup
    ctx = PassContext(calibration=calibration, teacher=graph)
    result = PassManager(f"distill{{steps=16,lr=0.0003,tail={tail}}}", [VerifyAfterPass()]).run(pruned, ctx)
    distilled = result.graph
    assert kd_to_teacher(distilled, graph, calibration) < 0.9 * kd_to_teacher(pruned, graph, calibration)
    stats = result.reports[0].stats
    assert stats["loss_last"] < stats["loss_first"] and stats["trained_params"] > 0
    assert distilled.num_params == pruned.num_params


def test_module_teacher_and_shared_weights_stay_shared(setup):
    model, graph, _, calibration = setup
    shared = ShareWeights(group=2)(graph, PassContext()).graph
    distilled = Distill(steps=4, lr=0.003, tail=1)(shared, PassContext(calibration=calibration, teacher=model)).graph
    assert distilled.num_params == shared.num_params  # one trained tensor per shared weight
    q0 = distilled.attribute("model.model.layers.0.self_attn.q_proj.weight")
    assert not torch.equal(q0, shared.attribute("model.model.layers.0.self_attn.q_proj.weight"))
    assert distilled.attribute("model.lm_head.weight") is shared.attribute("model.lm_head.weight")  # frozen, shared
    assert all(p.grad is None for p in graph.module.parameters())


def test_needs_teacher_and_calibration(setup):
    _, graph, pruned, calibration = setup
    with pytest.raises(PreconditionError, match="needs a teacher"):
        Distill(steps=2)(pruned, PassContext(calibration=calibration))
    with pytest.raises(PreconditionError, match="needs calibration data"):
        Distill(steps=2)(pruned, PassContext(teacher=graph))
    with pytest.raises(PipelineError):
        parse_pipeline("distill{steps=-1}")
    assert Distill(steps=0)(pruned, PassContext(calibration=calibration, teacher=graph)).modified is False


def test_task_weight_adds_the_context_loss(setup):
    """distill{task_weight=w} adds w * ctx.loss(output, batch) (an encoder's contrastive loss) to the KD loss."""
    _, graph, pruned, calibration = setup
    seen = []

    def loss(output, batch):
        seen.append(tuple(output.shape))
        return output.float().pow(2).mean()

    ctx = PassContext(calibration=calibration[:2], teacher=graph, loss=loss)
    plain = Distill(steps=2, lr=1e-4, tail=0)(pruned, ctx)
    assert seen == []  # task_weight=0: the context loss is not read
    weighted = Distill(steps=2, lr=1e-4, tail=0, task_weight=0.5)(pruned, ctx)
    assert len(seen) == 2 and seen[0][:2] == tuple(calibration[0][0].shape)
    assert weighted.stats["loss_first"] > plain.stats["loss_first"]  # the added term is positive


def test_masks_of_pruned_weights_stay_zero(setup):
    """Graph.masks (left by a pruning pass) are re-applied after every step."""
    _, graph, pruned, calibration = setup
    path = "model.model.layers.1.mlp.up_proj.weight"
    masked = pruned.copy()
    keep = torch.rand(masked.attribute(path).shape, generator=torch.Generator().manual_seed(0)) > 0.5
    weight = masked.attribute(path)
    owner, _, leaf = path.rpartition(".")
    setattr(masked.module.get_submodule(owner), leaf, torch.nn.Parameter(weight.detach() * keep, requires_grad=False))
    masked.masks[path] = keep
    result = Distill(steps=3, lr=1e-2, tail=0)(masked, PassContext(calibration=calibration, teacher=graph))
    trained = result.graph.attribute(path)
    assert result.stats["masked_params"] == 1
    assert torch.equal(trained[~keep], torch.zeros(int((~keep).sum())))
    assert not torch.equal(trained[keep], weight.detach()[keep])  # the kept weights did train
