"""quantized-distill's learned grids (searched clipping, LSQ-trained scales and zeros) and block-wise
reconstruction: exact packing of the trained forward, never worse than RTN's grid, block replay equal to the
graph's own run, real gains on vit-mnist, and the errors of bad combinations."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.analysis.blocks import BlockRunner, find_blocks
from fxpress.errors import OptionError, PreconditionError
from fxpress.ops.quant import QUANTIZED_LINEAR, quantize_weight
from fxpress.passes import PassContext, PassManager, VerifyAfterPass, parse_pipeline
from fxpress.passes.quant.blockwise import BlockForward, record, token_nmse
from fxpress.passes.quant.grid import GroupGrid, searched_grid
from fxpress.passes.quant.quantized_distill import softened_kl
from model_factories import PlainMlp

torch.set_num_threads(1)
FORMS = [("asym", "float", "float"), ("asym", "int", "int"), ("sym", None, "sym")]


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Student-t weights: a few large values per group, as trained layers have."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=generator)
    scale = torch.randn(rows, cols, 3, generator=generator).pow(2).mean(-1).sqrt()
    return normal / scale


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, importance: torch.Tensor) -> float:
    return float(((weight - approx.detach()) ** 2 * importance).sum())


@pytest.mark.parametrize("scheme,zero,form", FORMS)
def test_the_searched_grid_is_never_worse_than_rtns_and_much_better_at_2_bits(scheme, zero, form):
    weight = heavy_tailed(48, 96)
    importance = torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.1
    for bits in (2, 3, 4):
        grid = GroupGrid(weight, bits, 32, form, importance)
        searched = grid.packed(weight).dequantize()
        rtn = quantize_weight(weight, bits, 32, scheme, zero).dequantize()
        assert weighted_error(weight, searched, importance) <= weighted_error(weight, rtn, importance) * (1 + 1e-6)
        if bits == 2:  # clipping the tails is what 4 levels need
            assert weighted_error(weight, searched, importance) < 0.8 * weighted_error(weight, rtn, importance)


@pytest.mark.parametrize("scheme,zero,form", FORMS)
def test_the_packed_weight_decodes_to_the_trained_forward_exactly(scheme, zero, form):
    weight = heavy_tailed(20, 70, seed=1)  # K = 70: padded to 3 groups of 32
    grid = GroupGrid(weight, 2, 32, form)
    with torch.no_grad():  # a trained grid: scales moved, integer zeros off the integers
        grid.scale.mul_(1 + 0.1 * torch.rand(grid.scale.shape, generator=torch.Generator().manual_seed(2)))
        if grid.zero is not None:
            grid.zero.add_(0.3)
    forward = grid.quantize(weight)
    packed = grid.packed(weight)
    assert packed.in_features == 70 and forward.shape == (20, 70)
    assert torch.equal(packed.dequantize(), forward.detach())


def test_scales_zeros_and_weights_all_get_gradients():
    weight = heavy_tailed(8, 64, seed=4).requires_grad_(True)
    grid = GroupGrid(weight.detach(), 2, 32, "int")
    loss = (grid.quantize(weight) @ torch.randn(64, 5, generator=torch.Generator().manual_seed(5))).pow(2).sum()
    loss.backward()
    assert grid.scale.grad is not None and grid.scale.grad.abs().sum() > 0
    assert grid.zero.grad is not None and grid.zero.grad.abs().sum() > 0
    # the straight-through estimator: inside the clipped range dQ/dW = 1, outside 0
    w = weight.detach().view(8, 2, 32)
    scale, zero = grid.scale.detach().unsqueeze(-1), torch.round(grid.zero.detach()).unsqueeze(-1)
    codes = torch.round(w / scale) + zero
    inside = ((codes >= 0) & (codes <= 3)).view(8, 64)
    assert torch.all(weight.grad[~inside] == 0) and torch.any(weight.grad[inside] != 0)


def test_searched_grid_weighs_the_important_features():
    weight = heavy_tailed(16, 32, seed=6)
    loud = torch.ones(32)
    loud[:4] = 100.0  # four features carry most of the output
    even, weighted = (GroupGrid(weight, 2, 32, "int", imp) for imp in (None, loud))
    error = {name: weighted_error(weight, g.packed(weight).dequantize(), loud)
             for name, g in (("even", even), ("weighted", weighted))}
    assert error["weighted"] < error["even"]
    scale, zero = searched_grid(weight, 2, 32, "int", loud)
    assert scale.shape == zero.shape == (16, 1)


def test_a_block_replayed_on_recorded_values_gives_the_graphs_own_output(vit):
    graph, ctx = vit
    stack = find_blocks(graph)
    recorded = record(graph, stack, ctx.calibration)
    runner = BlockRunner(graph, stack, record=True)
    with torch.no_grad():
        runner(*ctx.calibration[1])
        x = recorded.first_inputs[1]
        for block in stack.blocks:
            x = BlockForward(graph, block)(x, recorded.outside[1])
            assert torch.equal(x, runner.outputs[block.position])
    assert float(token_nmse(x, x)) == 0.0


def test_learned_grid_and_blockwise_reconstruction_beat_rtn_at_2_bits_on_vit_mnist(vit):
    graph, ctx = vit
    before = [p.detach().clone() for p in graph.module.parameters()]
    rtn = PassManager("quantized-distill{bits=2,group=32,zero=int,steps=1,lr=1e-12,train_float=false}").run(
        graph, ctx)
    learned = PassManager("quantized-distill{bits=2,group=32,zero=int,grid=learned,blockwise=2,steps=4,lr=1e-3,"
                          "grid_lr=1e-3}", [VerifyAfterPass()]).run(graph, ctx)
    assert all(torch.equal(p, q) for p, q in zip(before, graph.module.parameters()))  # the input is untouched
    stats = learned.reports[0].stats
    assert stats["grid"] == "learned" and stats["blockwise"] == 2 and len(stats["blocks"]) == 4
    assert all(b["loss_after"] < b["loss_before"] for b in stats["blocks"])
    assert stats["quantized"] == 16
    nodes = [n for n in learned.graph.fx.nodes if n.target == QUANTIZED_LINEAR]
    assert len(nodes) == 16 and all(n.args[1] is not None for n in nodes)

    def kl(g) -> float:
        with torch.no_grad():
            return float(sum(softened_kl(g(*b), graph(*b), 1.0) for b in ctx.calibration) / len(ctx.calibration))

    assert kl(learned.graph) < 0.5 * kl(rtn.graph)
    assert kl(learned.graph) == pytest.approx(stats["kl_after"], rel=1e-4)  # the packed graph is the trained one


def test_bad_combinations_get_one_clear_error(vit):
    graph, ctx = vit
    with pytest.raises(OptionError, match="rounding=stochastic applies to grid=minmax"):
        parse_pipeline("quantized-distill{grid=learned,rounding=stochastic}")
    with pytest.raises(OptionError, match="blockwise reconstruction matches each block .* teacher=context"):
        parse_pipeline("quantized-distill{blockwise=1,teacher=context}")
    with pytest.raises(OptionError, match="nothing to train end to end"):
        parse_pipeline("quantized-distill{blockwise=1,train_float=false}")
    with pytest.raises(OptionError, match="blockwise must be >= 0 and grid_lr > 0"):
        parse_pipeline("quantized-distill{grid_lr=0}")
    parse_pipeline("quantized-distill{blockwise=1,steps=0}")  # block-wise reconstruction alone is fine
    x = torch.randn(8, 8)
    mlp = fxpress.capture(PlainMlp(inputs=8, hidden=32), (x,))
    with pytest.raises(PreconditionError, match="pass 'quantized-distill' failed: blockwise=1 needs a stack of "
                                                "repeated residual blocks: .*use blockwise=0"):
        PassManager("quantized-distill{blockwise=1,steps=0,quantize_first_last=true,group=8}").run(
            mlp, PassContext(calibration=[(x,)]))


def test_blockwise_after_token_merging_says_why_not(vit):
    graph, ctx = vit
    with pytest.raises(PreconditionError, match="pass 'quantized-distill' failed: block .* carries state besides "
                                                "its hidden stream .*blockwise=0"):
        PassManager("merge-tokens{r=4},quantized-distill{blockwise=1,steps=0}").run(graph, ctx)
    merged = PassManager("merge-tokens{r=4},quantized-distill{bits=4,steps=1}").run(graph, ctx)  # end to end works
    assert merged.reports[-1].stats["quantized"] > 0
