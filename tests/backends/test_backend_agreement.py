"""Backends agree with eager or say why: small user modules a new user would try, on llvm, onnx, native.

cosh/sinh on llvm (no vector intrinsic: written with exp), argmin/argmax(keepdim=True) without a dim
on onnx (the exporter dropped the kept dims), Conv3d without bias on onnx (onnxruntime rejected the
exported bias at the first call), training-mode dropout and batch norm (refused on every target),
and the checks every compiled model makes: output shapes and dtypes, runtime failures, buffer writes.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxpress import backends
from fxpress.backends.artifact import CompiledModel
from fxpress.backends.signature import TensorSpec
from fxpress.backends.structure import IOStructure
from fxpress.backends.tvm.driver import blame_intrinsic
from fxpress.errors import LoweringError
from fxpress.ir import capture

torch.set_num_threads(1)

TARGETS = ["llvm", "onnx", "native"]


class Apply(nn.Module):
    """A module that applies `fn` to its input (what a user writes to try one op)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class CoshSinh(nn.Module):
    def forward(self, x):
        return torch.cosh(x), torch.sinh(x)


class Counter(nn.Module):
    """Counts its calls in a buffer: state no compiled model can keep."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x + 1


def _capture(model: nn.Module, *inputs: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture warns about training mode; the backends refuse it
        return capture(model, inputs)


# -- cosh / sinh on llvm ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("schedule", [True, False])
def test_cosh_sinh_compile_for_llvm_and_match_eager(dtype, tolerance, schedule):
    x = torch.cat([torch.linspace(-88, 88, 997), torch.tensor([0.0, 1e-30, -1e-6, 1e-3, 0.999, 1.0, 1.001])]).to(dtype)
    compiled = backends.compile(_capture(CoshSinh(), x), "llvm", schedule=schedule)
    for got, want in zip(compiled(x), CoshSinh()(x)):
        assert got.dtype == want.dtype
        assert torch.allclose(got, want, rtol=tolerance, atol=0)


def test_an_intrinsic_tvm_cannot_build_is_blamed_on_its_op_and_node():
    graph = _capture(Apply(torch.cosh), torch.randn(4))
    message = ('TVM failed to compile for llvm: InternalError: unknown intrinsic ir.Op(span=None, '
               'name="tirx.cosh", num_inputs=1)')
    blamed = blame_intrinsic(graph, "llvm", message)
    assert isinstance(blamed, LoweringError)
    assert str(blamed).startswith("op aten.cosh at node cosh of graph Apply: TVM has no llvm code for cosh")
    assert blame_intrinsic(graph, "llvm", "some other failure") is None


# -- argmin / argmax over all elements with keepdim ----------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op", [torch.argmin, torch.argmax])
def test_whole_tensor_arg_reduction_keeps_dims(op, target):
    x = torch.randn(3, 5, 2)
    model = Apply(lambda t: op(t, keepdim=True))
    got = backends.compile(_capture(model, x), target)(x)
    assert got.shape == (1, 1, 1) and got.dtype == torch.int64 and torch.equal(got, model(x))


# -- Conv3d without bias ----------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["onnx", "llvm"])
def test_conv3d_without_bias_matches_eager(target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, 3, bias=False), nn.Conv3d(4, 4, 1, groups=2, bias=False)).eval()
    x = torch.randn(2, 3, 5, 5, 5)
    got = backends.compile(_capture(model, x), target)(x)
    assert torch.allclose(got, model(x), atol=1e-5)


# -- training mode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layer, op", [(nn.Dropout(0.5), "aten.dropout"), (nn.BatchNorm1d(8), "aten.batch_norm")])
def test_training_mode_is_refused_on_every_target(layer, op, target):
    model = nn.Sequential(nn.Linear(8, 8), layer).train()
    graph = _capture(model, torch.randn(4, 8))
    with pytest.raises(LoweringError) as caught:
        backends.compile(graph, target)
    message = str(caught.value)
    assert "\n" not in message and f"op {op} at node" in message and "model.eval()" in message


def test_training_mode_module_of_a_traced_graph_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture(model, (torch.randn(4, 8),), method="symbolic_trace")
    with pytest.raises(LoweringError, match="module 1 at node _1 .* runs in training mode"):
        backends.compile(graph, "onnx")


def test_eval_mode_dropout_compiles_to_identity_everywhere():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).eval()
    x = torch.randn(4, 8)
    graph = _capture(model, x)
    for target in TARGETS:
        assert torch.allclose(backends.compile(graph, target)(x), model(x), atol=1e-6)


def test_dropout_with_zero_probability_in_training_mode_compiles():
    """p=0 dropout (an HF model's attention dropout in training mode) is the identity: nothing to refuse."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.0)).train()
    x = torch.randn(4, 8)
    graph = _capture(model, x)
    assert any("dropout" in str(n.target) for n in graph.fx.nodes)
    assert torch.allclose(backends.compile(graph, "onnx")(x), model(x), atol=1e-6)


def test_a_model_that_writes_its_buffers_is_refused():
    graph = _capture(Counter().eval(), torch.randn(3))
    with pytest.raises(LoweringError, match=r"op aten.add_ at node add_ of graph Counter writes into the "
                                            r"model's tensor calls on every call"):
        backends.compile(graph, "onnx")


# -- what every compiled model checks -----------------------------------------------------------------
class _StubExecutable:
    """An executable that returns fixed outputs, or raises what its runtime would."""

    backend = "stub"
    params: dict = {}

    def __init__(self, outputs=None, error: Exception | None = None):
        self.outputs, self.error = outputs, error

    def run(self, inputs):
        if self.error is not None:
            raise self.error
        return self.outputs


def _stub_model(executable: _StubExecutable) -> CompiledModel:
    spec = TensorSpec("x", (2, 3), "float32")
    _, tensor_in = pytree.tree_flatten((torch.zeros(()),))
    _, tensor_out = pytree.tree_flatten(torch.zeros(()))
    structure = IOStructure(tensor_in, {}, tensor_out, ["tensor"], [TensorSpec("out", (2, 3), "float32")])
    return CompiledModel(executable, [spec], target="llvm", name="stub", structure=structure)


def test_an_output_of_the_wrong_shape_or_dtype_is_a_lowering_error():
    x = torch.zeros(2, 3)
    assert torch.equal(_stub_model(_StubExecutable([torch.ones(2, 3)]))(x), torch.ones(2, 3))
    with pytest.raises(LoweringError, match=r"output 0 of the stub backend is float32\[3, 2\], the captured "
                                            r"graph gives float32\[2, 3\]"):
        _stub_model(_StubExecutable([torch.ones(3, 2)]))(x)
    with pytest.raises(LoweringError, match=r"is int64\[2, 3\]"):
        _stub_model(_StubExecutable([torch.ones(2, 3, dtype=torch.int64)]))(x)
    with pytest.raises(LoweringError, match="returned 2 outputs, the captured graph has 1"):
        _stub_model(_StubExecutable([torch.ones(2, 3)] * 2))(x)


def test_a_runtime_failure_is_a_one_line_lowering_error():
    error = RuntimeError("[ONNXRuntimeError] : 1 : FAIL :\nNon-zero status running Conv node. Name:'node_conv3d'")
    with pytest.raises(LoweringError) as caught:
        _stub_model(_StubExecutable(error=error))(torch.zeros(2, 3))
    message = str(caught.value)
    assert "\n" not in message and "stub compiled for llvm failed in the stub runtime" in message
    assert "node_conv3d" in message


# -- higher-order ops beyond ExportDB -----------------------------------------------------------------
class DoubleThrice(nn.Module):
    def forward(self, i, x):
        from torch._higher_order_ops.while_loop import while_loop

        return while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x * 2), (i, x))


@pytest.mark.parametrize("target", TARGETS)
def test_while_loop_runs_on_native_and_is_refused_in_one_line_elsewhere(target):
    args = (torch.tensor(0), torch.randn(3))
    graph = _capture(DoubleThrice(), *args)
    if target != "native":
        with pytest.raises(LoweringError, match=r"^op torch.while_loop at node while_loop of graph DoubleThrice "
                                                r"has no (tvm|onnx) form \(it lowers torch.cond\); compile for "
                                                r"target 'native'"):
            backends.compile(graph, target)
        return
    count, doubled = backends.compile(graph, target)(*args)
    assert int(count) == 3 and torch.equal(doubled, args[1] * 8)
