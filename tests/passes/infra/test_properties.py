"""Hypothesis properties of the cleanup pipeline on generated MLP and conv stacks.

For any generated eval-mode model and either capture method: the pipeline's
result verifies, matches eager, never has more parameters, and a second run
changes nothing (every pass says modified=False, the code is identical).
fold-constants alone is bit-identical.  Canonical pipeline strings
round-trip through parse/format.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxpress
from fxpress.ir.verify import verify
from fxpress.passes import NumericCheck, PassContext, PassManager, VerifyAfterPass
from fxpress.passes.cleanup.dce import DeadCodeElimination
from fxpress.passes.cleanup.fold_constants import FoldConstants
from fxpress.passes.cleanup.fuse_batchnorm import FuseBatchNorm
from fxpress.passes.infra.registry import format_pipeline, parse_pipeline
from model_factories import randomize_batchnorm

torch.set_num_threads(1)

PIPELINE = "fold-constants,fuse-batchnorm,dce"
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
methods = st.sampled_from(["export", "symbolic_trace"])


# -- generated models ------------------------------------------------------------------------
class GeneratedMlp(nn.Module):
    """Input projection, then a stack of Linear/BN/ReLU/LayerNorm/residual/constant-buffer layers."""

    def __init__(self, in_features: int, width: int, layers: list[tuple[str, bool, bool]]):
        super().__init__()
        self.proj = nn.Linear(in_features, width)
        self.kinds = [kind for kind, _, _ in layers]
        self.layers = nn.ModuleList()
        for index, (kind, bias, affine) in enumerate(layers):
            if kind == "linear_bn":  # a bias-free linear gets an affine BN, so params never grow
                self.layers.append(nn.Sequential(nn.Linear(width, width, bias=bias),
                                                 nn.BatchNorm1d(width, affine=affine or not bias)))
            elif kind in ("linear", "residual"):
                self.layers.append(nn.Linear(width, width, bias=bias))
            elif kind == "layernorm":
                self.layers.append(nn.LayerNorm(width))
            else:
                self.layers.append(nn.Identity())
            if kind == "buffer":
                self.register_buffer(f"const{index}", torch.linspace(-1, 1, width) * (index + 1))

    def forward(self, x):
        x = self.proj(x)
        for index, (kind, layer) in enumerate(zip(self.kinds, self.layers)):
            if kind == "relu":
                x = torch.relu(x)
            elif kind == "residual":
                x = x + layer(x)
            elif kind == "buffer":
                const = getattr(self, f"const{index}")
                x = x * (const.exp() * 0.5) + const.sin()
            else:
                x = layer(x)
        return x


class GeneratedConvNet(nn.Module):
    """Conv/BN/ReLU/pooling stack on images, then a spatial mean."""

    def __init__(self, in_channels: int, channels: int, layers: list[tuple[str, int, bool, bool]]):
        super().__init__()
        body, current = [], in_channels
        for kind, kernel, bias, depthwise in layers:
            if kind in ("conv", "conv_bn"):
                groups = channels if depthwise and current == channels else 1
                body.append(nn.Conv2d(current, channels, kernel, padding=kernel // 2, bias=bias, groups=groups))
                if kind == "conv_bn":
                    body.append(nn.BatchNorm2d(channels))
                current = channels
            elif kind == "relu":
                body.append(nn.ReLU())
            else:
                body.append(nn.MaxPool2d(2) if kind == "maxpool" else nn.AvgPool2d(2))
        self.body = nn.Sequential(*body)

    def forward(self, x):
        return self.body(x).mean((2, 3))


@st.composite
def mlp_cases(draw):
    in_features, width = draw(st.integers(2, 10)), draw(st.integers(2, 12))
    kinds = st.sampled_from(["linear", "linear_bn", "relu", "layernorm", "residual", "buffer"])
    layers = draw(st.lists(st.tuples(kinds, st.booleans(), st.booleans()), min_size=1, max_size=6))
    model = GeneratedMlp(in_features, width, layers)
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.5)
    batch = draw(st.integers(1, 4))
    inputs = (torch.randn(batch, in_features, generator=torch.Generator().manual_seed(seed)),)
    return randomize_batchnorm(model, seed).eval(), inputs


@st.composite
def conv_cases(draw):
    in_channels, channels, size = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(4, 10))
    layers, current = [], size
    for kind in draw(st.lists(st.sampled_from(["conv", "conv_bn", "relu", "maxpool", "avgpool"]),
                              min_size=1, max_size=5)):
        if kind.endswith("pool"):
            if current < 2:
                continue
            current //= 2
        layers.append((kind, draw(st.sampled_from([1, 3])), draw(st.booleans()), draw(st.booleans())))
    if not any(kind.startswith("conv") for kind, _, _, _ in layers):
        layers.insert(0, ("conv_bn", 3, draw(st.booleans()), False))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = randomize_batchnorm(GeneratedConvNet(in_channels, channels, layers), seed).eval()
    inputs = (torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(seed)),)
    return model, inputs


# -- properties --------------------------------------------------------------------------------
def _check_pipeline(model: nn.Module, inputs: tuple, method: str) -> None:
    graph = fxpress.capture(model, inputs, method=method)
    ctx = PassContext(calibration=[inputs])
    result = PassManager(PIPELINE, [VerifyAfterPass(), NumericCheck()]).run(graph, ctx)
    verify(result.graph)
    expected = model(*inputs).detach()
    tolerance = 1e-5 + 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(result.graph(*inputs), expected, rtol=1e-4, atol=tolerance)
    assert result.graph.num_params <= graph.num_params
    again = PassManager(PIPELINE).run(result.graph, ctx)
    assert [r.modified for r in again.reports] == [False, False, False]
    assert again.graph.module.code == result.graph.module.code
    fused = [m for m in result.graph.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not fused and "batch_norm" not in result.graph.module.code


@SETTINGS
@given(case=mlp_cases(), method=methods)
def test_cleanup_pipeline_on_generated_mlps(case, method):
    _check_pipeline(*case, method)


@SETTINGS
@given(case=conv_cases(), method=methods)
def test_cleanup_pipeline_on_generated_convnets(case, method):
    _check_pipeline(*case, method)


@settings(max_examples=15, deadline=None)
@given(case=mlp_cases())
def test_fold_constants_is_bit_identical(case):
    model, inputs = case
    graph = fxpress.capture(model, inputs)
    result = FoldConstants()(graph, PassContext())
    assert torch.equal(result.graph(*inputs), graph(*inputs))
    assert result.modified == ("buffer" in model.kinds)
    assert result.graph.num_params == graph.num_params


pass_instances = st.one_of(
    st.builds(FoldConstants, max_growth=st.floats(1e-3, 1e6, allow_nan=False, allow_infinity=False),
              fold_params=st.booleans()),
    st.builds(FuseBatchNorm),
    st.builds(DeadCodeElimination),
)


@settings(max_examples=25, deadline=None)
@given(passes=st.lists(pass_instances, min_size=1, max_size=5))
def test_pipeline_text_round_trips(passes):
    text = format_pipeline(passes)
    parsed = parse_pipeline(text)
    assert format_pipeline(parsed) == text
    assert parsed == passes
