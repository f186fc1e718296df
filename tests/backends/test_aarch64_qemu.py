"""aarch64 artifacts run under qemu-aarch64 with the host's outputs (fxpress.backends.edge).

Each zoo model is captured once at a batch of real test images, compiled for
"aarch64" (saved: manifest, params, tar of aarch64 objects) and for "llvm";
the saved artifact runs under qemu-aarch64 on TVM's aarch64 runtime and
must agree with the host: float outputs within 1e-4 of the largest host
output, the same classes.  The binary ops are integer popcounts: with
power-of-two scales and integer biases their outputs are exact, so the
binary-op graph must be bit-identical on both CPUs and to eager.

Needs `apt-get install g++-aarch64-linux-gnu qemu-user` and, once,
`scripts/fetch_aarch64_runtime.sh`; without them these tests skip saying so.
"""
from __future__ import annotations

import struct

import pytest
import torch
from torch import nn

import fxpress
from fxpress.backends.edge import (FETCH_SCRIPT, INSTALL_TOOLCHAIN, EdgeError, edge_tools, read_tensors,
                                   run_edge, write_tensors)
from fxpress.passes import PassManager
from fxpress.zoo import load_dataset

ops = torch.ops.fxpress
IMAGES = 8
RTOL = 1e-4  # of the largest |host output|


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tools():
    found = edge_tools()
    if not found.ready:
        pytest.skip(f"aarch64 emulation unavailable: {found.explain()}")
    return found


def _images(model) -> torch.Tensor:
    return load_dataset(model.dataset, "test").images[:IMAGES].contiguous()


def _edge_and_host(graph, inputs, tmp_path, saved=True):
    """(outputs under qemu, host outputs, the emulated run) for `graph` compiled for aarch64 and llvm; the
    aarch64 model runs from its saved folder, or (saved=False) is handed over as the CompiledModel."""
    compiled = fxpress.compile(graph, "aarch64")
    edge = run_edge(compiled.save(tmp_path / f"{graph.name}-aarch64") if saved else compiled, inputs)
    host = fxpress.compile(graph, "llvm")(*inputs)
    return edge.outputs, [host] if isinstance(host, torch.Tensor) else list(host), edge


def _assert_close(edge, host):
    assert len(edge) == len(host)
    for got, want in zip(edge, host):
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= RTOL * max(scale, 1e-30), (got - want).abs().max()


@pytest.mark.parametrize("name", ["cnn-digits", "vit-mnist"])
def test_float_zoo_model_on_aarch64_matches_host(name, tools, zoo_model, tmp_path):
    model = zoo_model(name)
    images = _images(model)
    graph = fxpress.capture(model.module, (images,), name=name)
    edge, host, run = _edge_and_host(graph, (images,), tmp_path)
    _assert_close(edge, host)
    assert torch.equal(edge[0].argmax(1), host[0].argmax(1))
    assert run.main_ms > 0


def test_bnn_digits_on_aarch64_matches_host(tools, zoo_model, tmp_path):
    model = zoo_model("bnn-digits")
    images = _images(model)
    captured = fxpress.capture(model.module, (images,), name="bnn-digits")
    binarized = PassManager("binarize").run(captured).graph
    graph = fxpress.capture(binarized.module, (images,), name="bnn-digits-binarized")
    targets = {node.target for node in graph.module.graph.nodes if node.op == "call_function"}
    assert {ops.binary_conv2d.default, ops.binary_linear.default} & targets, "binarize inserted no binary op"
    edge, host, _ = _edge_and_host(graph, (images,), tmp_path)
    _assert_close(edge, host)
    assert torch.equal(edge[0].argmax(1), host[0].argmax(1))


class ExactBinaryOps(nn.Module):
    """Binary conv (C=70: 3 words, padding, stride, dilation) then binary linear (K=112 not a multiple of
    64).  Scales are powers of two and biases integers, so every output is an exact float."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w_conv = nn.Parameter(torch.randn(9, 70, 3, 2, generator=generator))
        self.s_conv = nn.Parameter(2.0 ** torch.randint(-2, 3, (9,), generator=generator).float())
        self.b_conv = nn.Parameter(torch.randint(-5, 6, (9,), generator=generator).float())
        self.w_plain = nn.Parameter(torch.randn(16, 9, 2, 2, generator=generator))
        self.w_fc = nn.Parameter(torch.randn(65, 112, generator=generator))
        self.b_fc = nn.Parameter(torch.randint(-5, 6, (65,), generator=generator).float())

    def forward(self, x):
        y = ops.binary_conv2d(x, self.w_conv, self.s_conv, self.b_conv, [2, 1], [2, 1], [1, 2])  # (B, 9, 6, 8)
        y = ops.binary_conv2d(y - 0.5, self.w_plain, None, None, [1, 1], [0, 0], [2, 1])  # (B, 16, 4, 7)
        return ops.binary_linear(y.reshape(y.shape[0], 4, 112), self.w_fc, None, self.b_fc)  # (B, 4, 65)


def _binary_inputs() -> torch.Tensor:
    x = torch.randn(2, 70, 9, 8, generator=torch.Generator().manual_seed(1))
    x[0, :, 0, 0], x[1, :, 3, 3], x[1, 5, 4, 4] = 0.0, -0.0, float("nan")  # sign(+-0) = +1, sign(NaN) = -1
    return x


@pytest.mark.parametrize("form", ["trainable", "mst"])
def test_binary_ops_are_bit_exact_on_aarch64(form, tools, tmp_path):
    x = _binary_inputs()
    module = ExactBinaryOps().eval()
    graph = fxpress.capture(module, (x,), name=f"exact-binary-{form}")
    if form == "mst":
        graph = PassManager("xnor-mst").run(graph).graph
    with torch.no_grad():
        eager = module(x)
    edge, host, _ = _edge_and_host(graph, (x,), tmp_path, saved=form == "mst")
    assert torch.equal(eager, eager.round()) and eager.abs().max() > 0  # the test's premise: exact values
    assert torch.equal(host[0], eager)
    assert torch.equal(edge[0], host[0])


def test_tensor_files_round_trip(tmp_path):
    tensors = [torch.randn(2, 3), torch.arange(5, dtype=torch.int64), torch.tensor(True), torch.empty(0, 4),
               torch.randn(3, 2).t(), torch.randn(4).to(torch.bfloat16)]
    write_tensors(tmp_path / "t.fxt", tensors)
    back = read_tensors(tmp_path / "t.fxt")
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(tensors, back)) and len(back) == 6
    header = (tmp_path / "t.fxt").read_bytes()[:16]
    assert header[:4] == b"FXT1" and struct.unpack("<IBBHI", header[4:16]) == (6, 2, 32, 1, 2)


def test_missing_runtime_is_an_error_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_CACHE", str(tmp_path))
    found = edge_tools()
    assert not found.ready and found.runtime is None
    assert FETCH_SCRIPT in found.explain()
    with pytest.raises(EdgeError, match="fetch_aarch64_runtime.sh"):
        run_edge(tmp_path / "nowhere", (torch.zeros(1),))
    monkeypatch.setenv("FXPRESS_QEMU_AARCH64", "no-such-qemu-aarch64")
    assert INSTALL_TOOLCHAIN in edge_tools().explain()
