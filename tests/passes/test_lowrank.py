"""low-rank: linears and convs -> two factors (SVD, whitened SVD); shapes and stats by hand, exactness at
full rank, asvd against svd on correlated inputs, min_gain, bad input, recovery through distill."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.nn.functional as F
from torch import nn

import fxpress
from fxpress.errors import OptionError, PreconditionError
from fxpress.ir.builder import origin
from fxpress.ir.printer import format_graph
from fxpress.passes import NumericCheck, PassContext, PassManager, VerifyAfterPass, parse_pipeline
from model_factories import snapshot, tiny_llama, token_batches, unchanged

torch.set_num_threads(1)
aten = torch.ops.aten


def checked(pipeline: str) -> PassManager:
    return PassManager(pipeline, [VerifyAfterPass(), NumericCheck()])


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(32, 48), nn.Linear(48, 48), nn.Linear(48, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    """A strided 3x3 conv without bias, a 3x3 conv with bias, a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.head = nn.Linear(24 * 3 * 3, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def truncated(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-`rank` truncated SVD of a (out, in) matrix, by hand."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank] @ vh[:rank]).float()


def energy(weight: torch.Tensor, rank: int) -> float:
    power = torch.linalg.svdvals(weight.detach().double()) ** 2
    return float(power[:rank].sum() / power.sum())


def test_linears_become_two_linears_with_the_hand_computed_shapes_stats_and_values():
    model = Mlp().eval()
    graph = fxpress.capture(model, (torch.randn(4, 32),))
    result = checked("low-rank{rank=4}").run(graph, PassContext())
    new, stats = result.graph, result.reports[0].stats
    assert stats["factorized"] == ["fc1", "fc2"] and "head" in stats["left"]  # the head stays dense by default
    fc1 = stats["per_layer"]["fc1"]
    assert (fc1["rank"], fc1["max_rank"], fc1["params_before"], fc1["params_after"]) == (4, 32, 48 * 32, 4 * (32 + 48))
    assert (fc1["macs_before"], fc1["macs_after"]) == (4 * 48 * 32, 4 * 4 * (32 + 48))  # batch 4
    assert fc1["energy_kept"] == pytest.approx(energy(model.fc1.weight.detach(), 4), abs=1e-5)
    assert stats["params_before"] - stats["params_after"] == 48 * 32 + 48 * 48 - 4 * (32 + 48) - 4 * (48 + 48)
    assert new.attribute("fc1.weight_v").shape == (4, 32) and new.attribute("fc1.weight_u").shape == (48, 4)
    factors = [n for n in new.fx.nodes if n.target == aten.linear.default and origin(n)["pass"] == "low-rank"]
    assert [n.name for n in factors] == ["fc1_v", "fc1_u", "fc2_v", "fc2_u"]
    assert [new.info(n).module_path for n in factors] == ["fc1", "fc1", "fc2", "fc2"]
    assert [new.info(n).macs for n in factors] == [4 * 4 * 32, 4 * 48 * 4, 4 * 4 * 48, 4 * 48 * 4]
    reference = Mlp().eval()
    with torch.no_grad():
        for layer in (reference.fc1, reference.fc2):
            layer.weight.copy_(truncated(layer.weight, 4))
    x = torch.randn(5, 32)
    torch.testing.assert_close(new(x), reference(x), rtol=1e-4, atol=1e-5)
    again = checked("low-rank{rank=4}").run(new, PassContext()).reports[0]
    assert not again.modified and again.stats["left"]["fc1"] == "already factorized"


def test_a_conv_becomes_a_kxk_conv_to_rank_channels_and_a_1x1_conv():
    model = ConvNet().eval()
    x = torch.randn(2, 8, 6, 6)
    graph = fxpress.capture(model, (x,))
    result = checked("low-rank{rank=4}").run(graph, PassContext())
    new, stats = result.graph, result.reports[0].stats
    assert stats["factorized"] == ["conv1", "conv2"]
    assert new.attribute("conv1.weight_v").shape == (4, 8, 3, 3)  # k x k conv to rank channels
    assert new.attribute("conv1.weight_u").shape == (16, 4, 1, 1)  # then 1 x 1 to the output channels
    conv2 = stats["per_layer"]["conv2"]
    assert (conv2["kind"], conv2["max_rank"], conv2["params_after"]) == ("conv2d", 24, 4 * (16 * 9 + 24))
    assert (conv2["macs_before"], conv2["macs_after"]) == (2 * 9 * 24 * 16 * 9, 2 * 9 * 4 * (16 * 9 + 24))  # 3x3 out
    inner = next(n for n in new.fx.nodes if n.name == "conv1_v")
    assert inner.target == aten.conv2d.default and inner.args[3:] == ([2, 2], [1, 1], [1, 1], 1)  # stride kept
    w1, w2 = model.conv1.weight.detach(), model.conv2.weight.detach()
    low1, low2 = truncated(w1.reshape(16, -1), 4).reshape(w1.shape), truncated(w2.reshape(24, -1), 4).reshape(w2.shape)
    hidden = F.relu(F.conv2d(F.relu(F.conv2d(x, low1, None, 2, 1)), low2, model.conv2.bias, 1, 1))
    torch.testing.assert_close(new(x), model.head(hidden.flatten(1)), rtol=1e-4, atol=1e-5)


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(4, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


GOLDEN_AFTER = """\
graph ConvLinear (export): nodes=14 params=400 bytes=1,600 macs=3,392
%x = input : f32[2,4,4,4]  # <top>
%conv_v = aten.conv2d(%x, %conv_weight_v, None, [1, 1], [1, 1], [1, 1], 1) : f32[2,2,4,4]  # conv (Conv2d) macs=2304
%conv_u = aten.conv2d(%conv_v, %conv_weight_u, %conv_bias, [1, 1], [0, 0], [1, 1], 1) : f32[2,8,4,4]  # conv (Conv2d) macs=512
%relu = aten.relu(%conv_u) : f32[2,8,4,4]  # <top> (ConvLinear)
%flatten = aten.flatten.using_ints(%relu, 1) : f32[2,128]  # <top> (ConvLinear)
%fc_v = aten.linear(%flatten, %fc_weight_v) : f32[2,2]  # fc (Linear) macs=512
%fc_u = aten.linear(%fc_v, %fc_weight_u, %fc_bias) : f32[2,16]  # fc (Linear) macs=64
return (%fc_u,)"""


def test_golden_ir_after_low_rank():
    graph = fxpress.capture(ConvLinear().eval(), (torch.randn(2, 4, 4, 4),))
    result = checked("low-rank{rank=2,head=true}").run(graph, PassContext())
    assert format_graph(result.graph, show_params=False).strip() == GOLDEN_AFTER


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_full_rank_is_exact_and_the_model_is_left_alone(method):
    for model, x in ((Mlp().eval(), torch.randn(4, 32)), (ConvNet().eval(), torch.randn(2, 8, 6, 6))):
        before = snapshot(model)
        graph = fxpress.capture(model, (x,))
        ctx = PassContext(calibration=[(torch.randn_like(x),) for _ in range(2)])
        result = checked(f"low-rank{{energy=1.0,min_gain=-1,head=true,method={method}}}").run(graph, ctx)
        stats = result.reports[0].stats
        assert len(stats["factorized"]) == 3 and all(e["rank"] == e["max_rank"] for e in stats["per_layer"].values())
        assert all(e["output_error"] < 1e-6 for e in stats["per_layer"].values())
        torch.testing.assert_close(result.graph(x), model(x), rtol=1e-4, atol=1e-5)
        assert unchanged(model, before) and graph.num_params == sum(p.numel() for p in model.parameters())


def correlated_batches(features: int, count: int, seed: int) -> list[tuple[torch.Tensor]]:
    """Inputs living near an 8-dimensional subspace, with uneven scales: where whitening pays off."""
    generator = torch.Generator().manual_seed(0)  # one mixing matrix for every call
    mix = torch.randn(8, features, generator=generator) * torch.logspace(0, -1, 8)[:, None]
    generator.manual_seed(seed)
    return [(torch.randn(32, 8, generator=generator) @ mix + 0.02 * torch.randn(32, features, generator=generator),)
            for _ in range(count)]


def test_asvd_beats_svd_at_equal_params_on_correlated_inputs():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 64)).eval()
    calibration, held_out = correlated_batches(64, 8, seed=1), correlated_batches(64, 4, seed=2)
    graph = fxpress.capture(layer, calibration[0])
    ctx = PassContext(calibration=calibration)
    errors, params = {}, {}
    for method in ("svd", "asvd"):
        result = checked(f"low-rank{{rank=8,method={method},head=true}}").run(graph, ctx)
        params[method] = result.graph.num_params
        with torch.no_grad():
            errors[method] = sum(float((result.graph(x) - layer(x)).norm() / layer(x).norm()) for (x,) in held_out)
        proxy = result.reports[0].stats["per_layer"]["0"]["output_error"]  # on the calibration inputs
        assert proxy == pytest.approx(errors[method] / len(held_out), rel=0.25)
    assert params["svd"] == params["asvd"] == 8 * (64 + 64) + 64
    assert errors["asvd"] < 0.1 * errors["svd"]  # measured: relative output error 0.013 against 0.74


def test_energy_picks_a_rank_per_layer_and_min_gain_keeps_layers_dense():
    graph = fxpress.capture(Mlp().eval(), (torch.randn(4, 32),))
    stats = checked("low-rank{energy=0.5,min_gain=0.0,align=1}").run(graph, PassContext()).reports[0].stats
    for name, entry in stats["per_layer"].items():
        weight = graph.attribute(f"{name}.weight")
        assert entry["energy_kept"] >= 0.5 > energy(weight, entry["rank"] - 1)  # the smallest such rank
        assert entry["energy_rank"] == entry["rank"]  # align=1: not rounded
    # random weights keep 99% energy only near full rank: no layer gets 10% fewer MACs
    report = checked("low-rank{energy=0.99}").run(graph, PassContext()).reports[0]
    assert not report.modified and "min_gain" in report.stats["left"]["fc1"]
    assert "no layer in scope gets at least min_gain" in report.stats["reason"]


def test_align_rounds_energy_ranks_up_to_a_multiple_at_most_the_max_rank():
    graph = fxpress.capture(Mlp().eval(), (torch.randn(4, 32),))
    plain = checked("low-rank{energy=0.6,min_gain=-1}").run(graph, PassContext()).reports[0].stats["per_layer"]
    assert {name: entry["rank"] for name, entry in plain.items()} == {"fc1": 10, "fc2": 12}  # by their spectra
    for align, want in ((8, {"fc1": 16, "fc2": 16}), (5, {"fc1": 10, "fc2": 15}), (40, {"fc1": 32, "fc2": 40})):
        result = checked(f"low-rank{{energy=0.6,min_gain=-1,align={align}}}").run(graph, PassContext())
        stats = result.reports[0].stats
        assert stats["align"] == align and {name: e["rank"] for name, e in stats["per_layer"].items()} == want
        for name, entry in stats["per_layer"].items():
            assert entry["energy_rank"] == plain[name]["rank"]  # what energy asked for, reported beside the rank
            assert entry["rank"] % align == 0 or entry["rank"] == entry["max_rank"]  # fc1 at align=40: 32, its max
            assert entry["energy_kept"] >= plain[name]["energy_kept"]  # rounding up never keeps less
            assert entry["energy_kept"] == pytest.approx(energy(graph.attribute(f"{name}.weight"), entry["rank"]),
                                                         abs=1e-5)
            assert result.graph.attribute(f"{name}.weight_v").shape[0] == entry["rank"]


def test_align_checks_min_gain_on_the_rounded_rank_and_leaves_explicit_ranks_alone():
    graph = fxpress.capture(Mlp().eval(), (torch.randn(4, 32),))
    unrounded = checked("low-rank{energy=0.6,min_gain=0.0}").run(graph, PassContext()).reports[0]
    assert unrounded.stats["factorized"] == ["fc1", "fc2"]  # ranks 10 and 12 gain MACs
    report = checked("low-rank{energy=0.6,min_gain=0.0,align=48}").run(graph, PassContext()).reports[0]
    assert not report.modified  # rounded up to 32 and 48, their max ranks: more MACs than dense
    assert report.stats["left"]["fc2"] == "rank 48 (energy's 12 rounded up to align=48) of 48 cuts MACs by -1.00 " \
                                          "< min_gain=0.0"
    stats = checked("low-rank{rank=5,align=8}").run(graph, PassContext()).reports[0].stats
    assert {name: (e["rank"], e["energy_rank"]) for name, e in stats["per_layer"].items()} == \
        {"fc1": (5, None), "fc2": (5, None)}  # rank= is used as given


@settings(max_examples=6, deadline=None)
@given(rank=st.integers(1, 32), min_gain=st.sampled_from([0.0, 0.1, 0.5]))
def test_params_and_macs_never_grow_and_a_second_run_has_nothing_to_do(rank, min_gain):
    graph = fxpress.capture(Mlp().eval(), (torch.randn(4, 32),))
    result = checked(f"low-rank{{rank={rank},min_gain={min_gain}}}").run(graph, PassContext())
    report = result.reports[0]
    assert report.after["params"] <= report.before["params"] and result.graph.macs <= graph.macs
    assert report.modified == (rank * (48 + 48) <= (1 - min_gain) * 48 * 48)  # fc2's gain decides (fc1's is less)
    assert not checked(f"low-rank{{rank={rank},min_gain={min_gain}}}").run(result.graph, PassContext()).modified


def test_matmul_forms_and_shared_weights_are_factorized_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(torch.randn(32, 64))  # stored (in, out): read by mm
            self.fc = nn.Linear(64, 64)
            self.head = nn.Linear(64, 2)

        def forward(self, x):
            return self.head(self.fc(torch.relu(self.fc(torch.mm(x, self.w)))))

    model = Shared().eval()
    x = torch.randn(4, 32)
    graph = fxpress.capture(model, (x,))
    result = checked("low-rank{energy=1.0,min_gain=-1}").run(graph, PassContext())
    new, stats = result.graph, result.reports[0].stats
    assert stats["factorized"] == ["w", "fc"] and stats["per_layer"]["w"]["shape"] == [32, 64]
    assert new.attribute("w_v").shape == (32, 32) and new.attribute("fc.weight_u").shape == (64, 64)
    assert sum(1 for n in new.fx.nodes if n.op == "get_attr" and n.target == "fc.weight_u") == 2  # both uses
    torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-4)  # full rank: exact


def test_bad_input_gets_one_clear_error():
    for text, message in (("low-rank{rank=0}", "rank must be >= 1, got 0"),
                          ("low-rank{energy=0}", r"energy must be in \(0, 1\], got 0.0"),
                          ("low-rank{energy=1.5}", r"energy must be in \(0, 1\], got 1.5"),
                          ("low-rank{rank=4,energy=0.9}", "set rank or energy, not both"),
                          ("low-rank{min_gain=1}", r"min_gain must be in \[-1, 1\)"),
                          ("low-rank{align=0}", r"align must be an integer >= 1 \(1: ranks as energy picks them\), "
                                                r"got 0"),
                          ("low-rank{energy=0.9,align=-8}", "align must be an integer >= 1 .*got -8")):
        with pytest.raises(OptionError, match=f"pass 'low-rank': {message}"):
            parse_pipeline(text)
    graph = fxpress.capture(Mlp().eval(), (torch.randn(4, 32),))
    with pytest.raises(PreconditionError, match=r"pass 'low-rank' failed: rank=40 is above min\(out, in\) = 32 of "
                                                r"layer fc1 \(%linear : .*weight \(48, 32\)\); set rank <= 32"):
        PassManager("low-rank{rank=40,layers=fc1;fc2}").run(graph, PassContext())
    with pytest.raises(PreconditionError, match=r"rank=49 is above min\(out, in\) = 32 of layer fc1"):
        PassManager("low-rank{rank=49}").run(graph, PassContext())  # above every layer's
    with pytest.raises(PreconditionError, match="method=asvd needs calibration batches.*or use method=svd"):
        PassManager("low-rank{method=asvd}").run(graph, PassContext())
    with pytest.raises(PreconditionError, match="layers=fc9 matches no linear or conv2d.*fc1"):
        PassManager("low-rank{layers=fc9}").run(graph, PassContext())
    with pytest.raises(PreconditionError, match="no float linear or conv2d left to factorize.*run low-rank before"):
        PassManager("quantize{bits=4,group=16,head=true},low-rank").run(graph, PassContext())
    text = "low-rank{rank=8,energy=None,method=asvd,layers=fc1;fc2,min_gain=0.2,head=false,damp=0.01,align=8}"
    assert str(parse_pipeline(text)[0]) == text


def test_distill_recovers_a_factorized_tiny_llama():
    model = tiny_llama(layers=2)
    batches = token_batches(4)
    graph = fxpress.capture(model, batches[0])
    ctx = PassContext(teacher=model, calibration=batches)
    result = PassManager("low-rank{rank=4,method=asvd},distill{steps=8,lr=3e-3}", [VerifyAfterPass()]).run(graph, ctx)
    factorize, distill = (report.stats for report in result.reports)
    assert len(factorize["factorized"]) == 2 * 7 and factorize["params_after"] < factorize["params_before"]
    assert distill["trained_params"] >= factorize["params_after"] - 64 * 32  # the factors train; the tied embedding not
    assert distill["loss_last"] < 0.8 * distill["loss_first"]
