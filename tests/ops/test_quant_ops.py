"""fxpress::quantized_linear / quantized_embedding: the packed layout, rounding bounds, the reference, facts, export."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxpress
from fxpress.ir.opinfo import ops_in
from fxpress.ops.quant import (BITS, QUANTIZED_EMBEDDING, QUANTIZED_LINEAR, QuantizedWeight, dequantize,
                               pack_codes, packed_bytes, quantize_weight, unpack_codes)

torch.set_num_threads(1)
SCHEMES = [("asym", "float"), ("asym", "int"), ("sym", None)]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 6), columns=st.integers(1, 70), bits=st.sampled_from(BITS), seed=st.integers(0, 99))
def test_pack_unpack_round_trips(rows, columns, bits, seed):
    q = torch.randint(0, 2 ** bits, (rows, columns), generator=torch.Generator().manual_seed(seed))
    codes = pack_codes(q, bits)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (rows, -(-columns * bits // 8))
    assert torch.equal(unpack_codes(codes, bits, columns).long(), q)


@pytest.mark.parametrize("bits", BITS)
def test_codes_are_little_endian_bit_streams(bits):
    """Value k occupies bits [k*bits, (k+1)*bits) of the row's stream: the contract the C kernels read."""
    q = torch.randint(0, 2 ** bits, (3, 13), generator=torch.Generator().manual_seed(bits))
    codes = pack_codes(q, bits)
    for row in range(3):
        stream = sum(int(byte) << (8 * i) for i, byte in enumerate(codes[row].tolist()))
        assert [(stream >> (k * bits)) & (2 ** bits - 1) for k in range(13)] == q[row].tolist()
    if bits == 4:  # byte k // 2, low nibble = even k
        assert codes[0, 0] == q[0, 0] | (q[0, 1] << 4)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), groups=st.integers(1, 4), group=st.sampled_from([4, 8, 32]),
       bits=st.sampled_from(BITS), scheme=st.sampled_from(SCHEMES), seed=st.integers(0, 99))
def test_rounding_stays_within_half_a_step(rows, groups, group, bits, scheme, seed):
    weight = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed))
    packed = quantize_weight(weight, bits, group, *scheme)
    step = packed.scales.abs().repeat_interleave(group, 1)
    assert ((packed.dequantize() - weight).abs() <= step / 2 * (1 + 1e-4) + 1e-7).all()
    assert int(packed.unpacked_codes().max()) < 2 ** bits
    zero_bytes = {"float": 4, "int": 1, None: 0}[scheme[1]]
    assert packed.nbytes == rows * (packed_bytes(groups * group, bits) + groups * (4 + zero_bytes))
    assert packed.bits_per_weight == pytest.approx(8 * packed.nbytes / weight.numel())


def test_eight_bits_lose_under_one_percent():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    for scheme in SCHEMES:
        packed = quantize_weight(weight, 8, 32, *scheme)
        error = packed.dequantize() - weight
        assert (error.abs() <= packed.scales.abs().repeat_interleave(32, 1) / 2 * (1 + 1e-4)).all()
        assert error.norm() / weight.norm() < 0.01, scheme


def test_stored_forms_and_padding():
    weight = torch.randn(6, 40)
    with pytest.raises(ValueError, match="K = 40 is not a multiple of group 32"):
        quantize_weight(weight, 4, 32)
    padded = quantize_weight(weight, 3, 32, "asym", "int", pad=True)
    assert padded.codes.shape == (6, packed_bytes(64, 3)) and padded.scales.shape == (6, 2)
    assert padded.zeros.dtype == torch.uint8 and padded.form == "int" and padded.dequantize().shape == (6, 40)
    assert quantize_weight(weight[:, :32], 4, 32, "sym").zeros is None
    assert quantize_weight(weight[:, :32], 4, 32).zeros.dtype == torch.float32
    with pytest.raises(ValueError, match="scheme=sym has no zero point"):
        quantize_weight(weight, 4, 8, "sym", "int")
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8"):
        quantize_weight(weight, 5, 8)


def test_a_q4_1_weight_is_reproduced_exactly():
    """GGUF Q4_1 (SmolLM2's source): W = d * q + m per group of 32 with fp16 d, m: 4-bit g32 float zero is exact."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (8, 4, 32), generator=generator)
    q[..., 0], q[..., 1] = 0, 15  # every group spans its whole range, as a quantized group does
    d = (torch.rand(8, 4, 1, generator=generator) * 0.01).half().float()
    m = (torch.randn(8, 4, 1, generator=generator) * 0.05).half().float()
    weight = (d * q + m).reshape(8, 128)
    packed = quantize_weight(weight, 4, 32, "asym", "float")
    assert torch.equal(packed.unpacked_codes().view(8, 4, 32), q.to(torch.uint8))
    assert (packed.dequantize() - weight).abs().max() < 1e-7


def test_a_codebook_replaces_the_uniform_levels():
    weight = torch.randn(4, 16)
    packed = quantize_weight(weight, 2, 8, "asym", "int")
    identity = QuantizedWeight(packed.codes, packed.scales, packed.zeros, torch.arange(4.0), 2, 8, 16)
    assert torch.equal(identity.dequantize(), packed.dequantize())
    levels = torch.tensor([-0.5, 0.25, 1.0, 3.0])
    learned = QuantizedWeight(packed.codes, packed.scales, packed.zeros, levels, 2, 8, 16)
    q = packed.unpacked_codes().long().view(4, 2, 8)
    expected = packed.scales.unsqueeze(-1) * (levels[q] - packed.zeros.float().unsqueeze(-1))
    torch.testing.assert_close(learned.dequantize(), expected.view(4, 16))
    assert learned.nbytes == packed.nbytes + 16
    sym = quantize_weight(weight, 2, 8, "sym")  # no zeros: the codebook holds signed levels
    centered = QuantizedWeight(sym.codes, sym.scales, None, torch.arange(4.0) - 2, 2, 8, 16)
    torch.testing.assert_close(centered.dequantize(), sym.dequantize())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_ops_equal_the_dequantized_weight(bits, scheme):
    weight, bias = torch.randn(9, 48), torch.randn(9)
    packed = quantize_weight(weight, bits, 16, *scheme)
    args = (packed.codes, packed.scales, packed.zeros, None)
    x = torch.randn(2, 5, 48)
    torch.testing.assert_close(QUANTIZED_LINEAR(x, *args, bias, bits, 16), F.linear(x, packed.dequantize(), bias))
    ids = torch.tensor([[0, 8, 3], [3, 1, 1]])
    torch.testing.assert_close(QUANTIZED_EMBEDDING(ids, *args, bits, 16, 48), packed.dequantize()[ids])


def test_gradient_reaches_x_and_bad_layouts_are_refused():
    packed = quantize_weight(torch.randn(6, 16), 4, 8)
    args = (packed.codes, packed.scales, packed.zeros, None, None, 4, 8)
    x = torch.randn(3, 16, requires_grad=True)
    QUANTIZED_LINEAR(x, *args).sum().backward()
    torch.testing.assert_close(x.grad, packed.dequantize().sum(0).expand(3, 16))
    with pytest.raises(ValueError, match="input features do not fit"):
        QUANTIZED_LINEAR(torch.randn(3, 24), *args)
    with pytest.raises(ValueError, match="codes must be uint8"):
        QUANTIZED_LINEAR(torch.randn(3, 16), packed.codes[:, :4], *args[1:])
    with pytest.raises(ValueError, match="codebook must be float32"):
        dequantize(packed.codes, packed.scales, packed.zeros, torch.arange(4.0), 4, 8, 16)


class PackedMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.packed = quantize_weight(torch.randn(10, 32), 4, 16, "asym", "int")
        for name, tensor in self.packed.tensors.items():
            self.register_buffer(name, tensor)
        self.bias = torch.nn.Parameter(torch.randn(10))

    def forward(self, x):
        return QUANTIZED_LINEAR(x, self.codes, self.scales, self.zeros, None, self.bias, 4, 16).relu()


def test_facts_and_export():
    model = PackedMlp().eval()
    graph = fxpress.capture(model, (torch.randn(2, 5, 32),))
    node = next(n for n in graph.fx.nodes if n.target == QUANTIZED_LINEAR)
    assert graph.info(node).shape == (2, 5, 10) and graph.info(node).macs == 2 * 5 * 10 * 32
    assert QUANTIZED_LINEAR in ops_in("matmul") and QUANTIZED_EMBEDDING in ops_in("embedding")
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(graph(x), model(x))
    assert graph.param_bytes == model.packed.nbytes + 10 * 4
