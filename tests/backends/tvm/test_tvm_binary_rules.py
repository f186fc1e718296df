"""The four binary ops compile for llvm (pack + popcount GEMM in TIR) and match eager.

Integers are exact, so outputs differ from eager only by the float rounding of
scale and bias (atol 1e-4).  One graph covers every op and geometry (padding,
stride, dilation, K not a multiple of 32 or 64, scale / bias None, 3-D linear
input, 0, -0.0 and NaN inputs); `xnor-mst` turns it into the MST forms.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import LoweringError
from fxpress.passes import PassManager
from fxpress.ops.binary import MST_OPS, TRAINABLE_OPS, ReusePlan, pack_weight
from fxpress.zoo import load_model

ops = torch.ops.fxpress
ATOL = 1e-4


class AllBinaryOps(nn.Module):
    """Two convs and two linears, trainable forms, with the awkward geometries."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w_pad = nn.Parameter(torch.randn(9, 70, 3, 2))  # C=70: 3 words, K=420
        self.s_pad, self.b_pad = nn.Parameter(torch.rand(9) + 0.5), nn.Parameter(torch.randn(9))
        self.w_plain = nn.Parameter(torch.randn(16, 9, 2, 2))  # no scale, no bias
        self.w_fc, self.b_fc = nn.Parameter(torch.randn(65, 112)), nn.Parameter(torch.randn(65))
        self.w_head, self.s_head = nn.Parameter(torch.randn(7, 65)), nn.Parameter(torch.rand(7))

    def forward(self, x):
        y = ops.binary_conv2d(x, self.w_pad, self.s_pad, self.b_pad, [2, 1], [2, 1], [1, 2])  # (B, 9, 6, 8)
        y = ops.binary_conv2d(y - 0.1, self.w_plain, None, None, [1, 1], [0, 0], [2, 1])  # (B, 16, 4, 7)
        y = ops.binary_linear(y.reshape(y.shape[0], 4, 112), self.w_fc, None, self.b_fc)  # 3-D, bias only
        return ops.binary_linear(y, self.w_head, self.s_head, None)  # (B, 4, 7), scale only


def _inputs(seed: int) -> torch.Tensor:
    x = torch.randn(2, 70, 9, 8, generator=torch.Generator().manual_seed(seed))
    x[0, :, 0, 0], x[1, :, 3, 3], x[1, 5, 4, 4] = 0.0, -0.0, float("nan")  # sign(+-0) = +1, sign(NaN) = -1
    return x


def _ops_in(graph) -> set:
    return {node.target for node in graph.module.graph.nodes if node.op == "call_function"}


@pytest.fixture(scope="module")
def trainable_graph():
    return fxpress.capture(AllBinaryOps().eval(), (_inputs(0),), name="all_binary_ops")


@pytest.fixture(scope="module")
def mst_graph(trainable_graph):
    graph = PassManager("xnor-mst").run(trainable_graph).graph
    assert _ops_in(graph) & set(TRAINABLE_OPS) == set() and set(MST_OPS) <= _ops_in(graph)
    return graph


@pytest.mark.parametrize("form", ["trainable", "mst"])
def test_every_binary_op_matches_eager_on_llvm(form, trainable_graph, mst_graph):
    graph = trainable_graph if form == "trainable" else mst_graph
    compiled = fxpress.compile(graph, "llvm")
    for seed in (1, 2):
        x = _inputs(seed)
        expected = trainable_graph(x)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(graph(x), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(compiled(x), expected, atol=ATOL, rtol=0)


def test_dynamic_batch_compiles_once_for_every_batch():
    graph = fxpress.capture(AllBinaryOps().eval(), (_inputs(0),), dynamic=True)
    compiled = fxpress.compile(graph, "llvm", dynamic=True)  # a 3-D linear: rows = batch * 4, one variable
    for batch in (1, 3):
        x = torch.randn(batch, 70, 9, 8, generator=torch.Generator().manual_seed(batch))
        torch.testing.assert_close(compiled(x), graph(x), atol=ATOL, rtol=0)


def test_weights_are_packed_at_load_time_and_gemm_is_scheduled(trainable_graph):
    from fxpress.backends.tvm.build import make_target
    from fxpress.backends.tvm.lowering import to_relax
    from fxpress.backends.tvm.pipeline import fused_module
    from fxpress.backends.targets import get_target

    mod = fused_module(to_relax(trainable_graph).mod, make_target(get_target("llvm")))
    per_call, load_time = mod["main"].script(), mod["main_transform_params"].script()
    assert "binary_weight" in load_time and "binary_conv2d_offset" in load_time
    assert "binary_weight" not in per_call and "_offset" not in per_call
    gemms = [func for gv, func in mod.functions.items() if "_gemm" in gv.name_hint]
    assert len(gemms) == 4 and all(bool(func.attrs["tirx.is_scheduled"]) for func in gemms)


class MisfitPackedWeight(nn.Module):
    """A packed weight with one word too many: eager ignores it, the TVM rule refuses it."""

    def __init__(self):
        super().__init__()
        weight = torch.randn(3, 40)
        packed = pack_weight(weight)
        self.register_buffer("packed", torch.cat([packed, packed[:, :1]], dim=1))
        star = ReusePlan(40, torch.arange(3).numpy(), -torch.ones(3, dtype=torch.int64).numpy(),
                         [torch.arange(40).numpy()] * 3)
        self.register_buffer("plan", star.to_tensor())

    def forward(self, x):
        return ops.binary_linear_mst(x, self.packed, self.plan, None, None)


def test_misfit_packed_weight_is_a_lowering_error_naming_the_node():
    graph = fxpress.capture(MisfitPackedWeight(), (torch.randn(2, 40),))
    with pytest.raises(LoweringError, match=r"binary_linear_mst.*packed_weight .*int64 \(N, 1\) for K=40"):
        fxpress.compile(graph, "llvm")


@pytest.fixture(scope="module")
def bnn():
    model = load_model("bnn-digits")
    return model, fxpress.capture(model.module, model.example_inputs, dynamic=True)


@pytest.mark.parametrize("pipeline", ["binarize", "binarize,xnor-mst"])
def test_bnn_digits_on_llvm_matches_eager(bnn, pipeline):
    model, graph = bnn
    compressed = PassManager(pipeline).run(graph).graph
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    static = fxpress.capture(compressed.module, (images,), name=f"bnn-{pipeline}")
    compiled = fxpress.compile(static, "llvm")
    expected = model.module(images)
    out = compiled(images)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert torch.equal(out.argmax(1), expected.argmax(1))
