"""Direct convolution on llvm (NHWC, HWIO weights lifted to load time): exact against eager, every
conv takes the rule, and the tile fits the registers."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fxpress import backends
from fxpress.ir import capture

torch.set_num_threads(1)


class Convs(nn.Module):
    """Dense (bias, stride 2, 1x1, no padding, one output channel), depthwise (dilated), grouped."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.dilated = nn.Conv2d(24, 24, 5, padding=4, dilation=2, groups=24, bias=False)
        self.pointwise = nn.Conv2d(24, 40, 1)
        self.grouped = nn.Conv2d(40, 40, 3, padding=1, groups=4)
        self.norm = nn.BatchNorm2d(40)
        self.valid = nn.Conv2d(40, 16, 3, bias=False)
        self.single = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.depthwise(x) + self.dilated(x)
        x = nn.functional.gelu(self.norm(self.grouped(self.pointwise(x))))
        return self.single(self.valid(x))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(0)
    model = Convs().eval()
    with torch.no_grad():  # a BatchNorm that is not the identity
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 30, 30)
    folder = tmp_path_factory.mktemp("ir")
    return model, x, backends.compile(capture(model, (x,), name="convs"), "llvm", dump_ir=folder), folder


def test_direct_conv_matches_eager(compiled):
    model, x, built, _ = compiled
    with torch.no_grad():
        expected = model(x)
    assert built(x).shape == expected.shape == (2, 1, 13, 13)
    assert (built(x) - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


def test_every_conv_takes_the_direct_rule_and_weights_are_transposed_at_load(compiled):
    *_, folder = compiled
    script = (folder / "02_scheduled.tir.py").read_text()
    kinds = re.findall(r'"fxpress.schedule": "conv-([\w-]+)"', script)
    # init and update blocks both carry the annotation: 3 dense, 2 depthwise, 1 grouped convolution, and
    # the 16 -> 1 channel head with vector lanes over its input channels
    assert (kinds.count("dense"), kinds.count("depthwise"), kinds.count("grouped")) == (6, 4, 2)
    assert kinds.count("channel-sums") == 2
    assert "im2col" not in script and "pad_temp_reindex" not in script
    transform = script[script.index("def main_transform_params"):script.index("def main(")]
    assert transform.count("transpose") >= 7  # every conv weight: OIHW -> HWIO, once at load


@pytest.mark.parametrize("width,channels,lanes,span", [(8, 32, 8, None), (4, 64, 8, None), (64, 16, 8, None),
                                                       (15, 40, 8, 10), (13, 1, 8, None), (8, 32, 16, None),
                                                       (7, 24, 4, None)])
def test_conv_tile_fits_the_registers_and_divides_the_row(width, channels, lanes, span):
    from fxpress.backends.tvm.conv_schedule import conv_tile

    registers = 32 if lanes >= 16 else 16
    pixels, vectors, vector = conv_tile(width, channels, lanes, span)
    assert width % pixels == 0 and channels % (vectors * vector) == 0
    assert (span or channels) % vector == 0 and vector <= lanes
    assert pixels * vectors + vectors + 1 <= registers - (2 if registers > 16 else 1)


def test_conv_tile_by_hand():
    from fxpress.backends.tvm.conv_schedule import conv_tile

    # cnn-digits' second conv on AVX2: 8 pixels x 32 channels; 6 pixels do not divide 8, so 4 x 2 vectors
    # (8 loads, 8 FMAs per step) against 8 x 1 (9 loads, 8 FMAs)
    assert conv_tile(8, 32, 8) == (4, 2, 8)
    assert conv_tile(64, 1, 8) == (8, 1, 1)  # one output channel (gdnet-lite's last): scalar, 8 pixels
    assert conv_tile(15, 40, 8, span=10) == (5, 2, 5)  # vectors of 5 stay inside groups of 10


def test_naive_schedules_keep_nchw():
    """schedule=False (TVM's naive loops, for comparisons) leaves the layout alone."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 6, 6)
    built = backends.compile(capture(model, (x,), name="naive"), "llvm", schedule=False)
    with torch.no_grad():
        assert (built(x) - model(x)).abs().max().item() < 1e-5


def test_ragged_output_channels_are_padded_to_whole_vectors(tmp_path):
    """A rank-11 conv (as low-rank makes them) computes 16 channels over zero-padded weights (padded at
    load) and slices 11, instead of running with one lane."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 11, 3, padding=2, dilation=2, bias=False), nn.Conv2d(11, 16, 1),
                          nn.ReLU()).eval()
    x = torch.randn(2, 32, 16, 16)
    built = backends.compile(capture(model, (x,), name="ragged"), "llvm", dump_ir=tmp_path)
    with torch.no_grad():
        assert (built(x) - model(x)).abs().max().item() < 1e-5
    script = (tmp_path / "02_scheduled.tir.py").read_text()
    transform = script[script.index("def main_transform_params"):script.index("def main(")]
    assert "R.nn.pad" in transform or "pad" in transform  # the weight padding runs once, at load
    assert re.search(r"T\.Buffer\(\(T\.int64\(3\), T\.int64\(3\), T\.int64\(32\), T\.int64\(16\)\)", script)
    assert script.count('"conv-dense"') == 4  # both convs, init and update


class Residual(nn.Module):
    """conv + bias, ReLU, then a skip add: three epilogue links after the conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


def test_a_chain_of_epilogues_is_computed_from_the_tile(tmp_path):
    """Bias, ReLU and the skip add are folded into the tile's write-back one after another, so the output
    is written once: no full-size intermediate buffers, no loop nests of their own after the tile."""
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 16, 12, 12)
    built = backends.compile(capture(model, (x,), name="residual"), "llvm", dump_ir=tmp_path)
    with torch.no_grad():
        assert (built(x) - model(x)).abs().max().item() < 1e-5
    script = (tmp_path / "02_scheduled.tir.py").read_text()
    name = re.search(r"def (fused_conv2d\w*_relu\w*_add\w*)\(", script).group(1)
    body = script[script.index(f"def {name}("):]
    body = body[:body.index("@T.prim_func")] if "@T.prim_func" in body else body
    allocated = re.findall(r"(\w+) = T\.sblock_alloc_buffer", body)
    # the input's zero padding is made by its NCHW -> NHWC transpose (PadInProducer), so the tiles are all
    assert allocated == ["conv2d_nhwc_intermediate_global"], allocated
    assert "T.max(" in body and body.count("T.parallel(") == 1


def test_a_conv_without_padding_reads_its_input_in_place(tmp_path):
    """TOPI's pad_temp of a 1x1 (or 'valid') conv is a plain copy of the input: it is inlined, so the
    tiles read the input where it lies; a padded conv keeps its (vectorized) padding copy."""
    torch.manual_seed(0)
    # (a 1x1 first: a padded conv straight after the input's layout transpose has its padding made there)
    model = nn.Sequential(nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3)).eval()
    x = torch.randn(2, 16, 12, 12)
    built = backends.compile(capture(model, (x,), name="unpadded"), "llvm", dump_ir=tmp_path)
    with torch.no_grad():
        assert (built(x) - model(x)).abs().max().item() < 1e-5
    script = (tmp_path / "02_scheduled.tir.py").read_text()
    functions = re.findall(r"def (\w*conv2d\w*)\((.*?)(?=\n    @T\.prim_func|\n    @R\.function|\Z)", script, re.S)
    padded = {name: "pad_temp = T.sblock_alloc_buffer" in body for name, body in functions}
    assert len(padded) == 3 and sorted(padded.values()) == [False, False, True], padded
    assert script.count('"conv-dense"') == 6


class Guided(nn.Module):
    """gdnet-lite's joins: a conv over a concatenation, one over an upsampling, one over a concatenation
    that something else reads too."""

    def __init__(self):
        super().__init__()
        self.image, self.depth = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fuse = nn.Conv2d(16, 8, 3, padding=2, dilation=2)
        self.up = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        image, depth = torch.relu(self.image(x)), torch.relu(self.depth(x))
        fused = torch.relu(self.fuse(torch.cat([image, depth], dim=1)))
        up = self.up(nn.functional.interpolate(fused, scale_factor=2, mode="bilinear", align_corners=False))
        shared = torch.cat([fused, image], dim=1)
        return self.head(shared) + shared.mean(dim=1, keepdim=True), up


def _conv_functions(script: str) -> dict[str, str]:
    return dict(re.findall(r"def (\w*conv2d\w*)\((.*?)(?=\n    @T\.prim_func|\n    @R\.function|\Z)", script, re.S))


def test_a_conv_over_a_concatenation_or_resize_is_padded_by_it(tmp_path, monkeypatch):
    """The zero padding of a conv whose input a concatenation, a resize or a layout transpose makes (read by
    the conv alone) is written by that copy's kernel, and the conv reads it in place: one copy, not two.
    A concatenation something else reads too keeps it (the conv pads its own copy)."""
    import tvm

    from fxpress.backends.tvm import conv_schedule

    torch.manual_seed(0)
    model = Guided().eval()
    x = torch.randn(2, 8, 12, 12)
    built = backends.compile(capture(model, (x,), name="guided"), "llvm", dump_ir=tmp_path)
    with torch.no_grad():
        for got, want in zip(built(x), model(x)):
            assert (got - want).abs().max().item() < 1e-5
    script = (tmp_path / "02_scheduled.tir.py").read_text()
    joined = set(re.findall(r"def (fused_\w*(?:concatenate|resize2d)\w*_pad\w*)\(", script))
    assert any("concatenate" in name for name in joined) and any("resize2d" in name for name in joined), joined
    padded = {name: "pad_temp = T.sblock_alloc_buffer" in body for name, body in _conv_functions(script).items()}
    # only head pads its own input (the shared concatenation); image's is padded by x's layout transpose
    assert len(padded) == 5 and [name for name, own in padded.items() if own] == ["fused_conv2d4_add2_add3"], padded

    unmoved = tmp_path / "unmoved"  # the pipeline without the pass: every padded conv copies its input
    monkeypatch.setattr(conv_schedule, "PadInProducer",
                        lambda: tvm.transform.module_pass(lambda mod, _ctx: mod, opt_level=0, name="unmoved"))
    backends.compile(capture(model, (x,), name="guided"), "llvm", dump_ir=unmoved)
    before = (unmoved / "02_scheduled.tir.py").read_text()
    assert sum("pad_temp = T.sblock_alloc_buffer" in body for body in _conv_functions(before).values()) == 4


def test_pad_unit_is_the_vector_or_half_of_avx512s():
    from fxpress.backends.tvm.conv_schedule import pad_unit

    assert (pad_unit(4), pad_unit(8), pad_unit(16)) == (4, 8, 8)


def test_a_rank_7_conv_runs_8_channels_on_every_x86_host(tmp_path):
    """7 output channels pad to 8 with AVX2 and with AVX-512 (not 16: a 256-bit tile is as fast per MAC
    on a core that splits 512-bit FMAs, and half the padding)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 7, 3, padding=1, bias=False), nn.Conv2d(7, 16, 1)).eval()
    x = torch.randn(2, 32, 16, 16)
    built = backends.compile(capture(model, (x,), name="rank7"), "llvm", dump_ir=tmp_path)
    with torch.no_grad():
        assert (built(x) - model(x)).abs().max().item() < 1e-5
    script = (tmp_path / "02_scheduled.tir.py").read_text()
    assert re.search(r"T\.Buffer\(\(T\.int64\(3\), T\.int64\(3\), T\.int64\(32\), T\.int64\(8\)\)", script)
    assert script.count('"conv-dense"') == 4 and '"conv-channel-sums"' not in script
