"""fxpress::sparse_linear: the compressed layout, the reference, the C kernel's paths, facts and export."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxpress
from fxpress.ops import native_sparse, sparse
from fxpress.ops.sparse import SPARSE_LINEAR, compress_weight, decompress

torch.set_num_threads(1)
needs_kernel = pytest.mark.skipif(not native_sparse.available(), reason="no C compiler for the sparse kernel: apt-get install gcc (or set CC)")
SHAPES = [(1536, 384, 28), (384, 1536, 5), (384, 384, 33), (7, 5, 3), (9, 13, 17), (13, 8, 1)]


def sparse_weight(out_features: int, in_features: int, block_rows: int, keep: float = 0.1, seed: int = 0):
    """A random weight with `keep` of its R x 1 blocks (R = block_rows) non-zero."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    kept = torch.rand(-(-out_features // block_rows), in_features, generator=generator) < keep
    return weight * kept.repeat_interleave(block_rows, 0)[:out_features]


@pytest.mark.parametrize("block_rows", [1, 4])
@pytest.mark.parametrize("out_features, in_features, tokens", SHAPES)
def test_layout_round_trips_and_stores_only_kept_blocks(block_rows, out_features, in_features, tokens):
    weight = sparse_weight(out_features, in_features, block_rows)
    packed = compress_weight(weight, block_rows)
    assert packed.values.shape[1] == block_rows and packed.col_index.dtype == packed.row_ptr.dtype == torch.int32
    assert packed.row_ptr.shape == (-(-out_features // block_rows) + 1,)
    assert packed.values.shape[0] == int(sparse.block_mask(weight, block_rows).sum())
    assert torch.equal(decompress(packed.values, packed.col_index, packed.row_ptr, out_features, in_features), weight)


@pytest.mark.parametrize("block_rows", [1, 4])
@pytest.mark.parametrize("out_features, in_features, tokens", SHAPES)
def test_op_equals_dense_linear(block_rows, out_features, in_features, tokens):
    weight = sparse_weight(out_features, in_features, block_rows, keep=0.3)
    packed = compress_weight(weight, block_rows)
    x, bias = torch.randn(2, tokens, in_features), torch.randn(out_features)
    args = (packed.values, packed.col_index, packed.row_ptr)
    expected = F.linear(x, weight, bias)
    torch.testing.assert_close(SPARSE_LINEAR(x, *args, bias, out_features), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse.sparse_linear_reference(x, *args, None, out_features), F.linear(x, weight),
                               rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("level", ["best", "scalar", "avx2", "avx512"])
@pytest.mark.parametrize("block_rows", [1, 4])
@pytest.mark.parametrize("out_features, in_features, tokens", SHAPES)
def test_kernel_paths_match_the_reference(level, block_rows, out_features, in_features, tokens):
    """Every path (one the build lacks falls back to the best it has), token counts off the vector width."""
    weight = sparse_weight(out_features, in_features, block_rows, keep=0.2, seed=1)
    packed = compress_weight(weight, block_rows)
    x, bias = torch.randn(tokens, in_features), torch.randn(out_features)
    for b in (bias, None):
        got = native_sparse.sparse_linear(x, packed.values, packed.col_index, packed.row_ptr, b, out_features, level)
        expected = sparse.sparse_linear_reference(x, packed.values, packed.col_index, packed.row_ptr, b, out_features)
        scale = expected.abs().max().clamp_min(1.0)
        assert ((got - expected).abs().max() / scale).item() < 1e-4


@needs_kernel
def test_empty_and_all_zero_weights():
    weight = torch.zeros(6, 10)
    packed = compress_weight(weight, 4)
    assert packed.values.shape == (0, 4)
    x, bias = torch.randn(3, 10), torch.randn(6)
    torch.testing.assert_close(SPARSE_LINEAR(x, packed.values, packed.col_index, packed.row_ptr, bias, 6),
                               bias.expand(3, 6))
    assert native_sparse.simd_level() in ("avx512", "avx2", "scalar")


def test_bad_layouts_are_refused():
    packed = compress_weight(sparse_weight(8, 6, 4), 4)
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="row_ptr"):
        SPARSE_LINEAR(x, packed.values, packed.col_index, packed.row_ptr, None, 12)
    with pytest.raises(ValueError, match="block_rows"):
        compress_weight(torch.randn(4, 4), 2)


def test_gradient_reaches_x():
    weight = sparse_weight(8, 6, 4, keep=0.5)
    packed = compress_weight(weight, 4)
    x = torch.randn(3, 6, requires_grad=True)
    SPARSE_LINEAR(x, packed.values, packed.col_index, packed.row_ptr, None, 8).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 6))


class SparseMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        packed = compress_weight(sparse_weight(10, 12, 4, keep=0.4), 4)
        self.register_buffer("values", packed.values)
        self.register_buffer("col_index", packed.col_index)
        self.register_buffer("row_ptr", packed.row_ptr)
        self.bias = torch.nn.Parameter(torch.randn(10))

    def forward(self, x):
        return SPARSE_LINEAR(x, self.values, self.col_index, self.row_ptr, self.bias, 10).relu()


def test_facts_and_export():
    model = SparseMlp().eval()
    graph = fxpress.capture(model, (torch.randn(2, 5, 12),))
    node = next(n for n in graph.fx.nodes if n.target == SPARSE_LINEAR)
    assert graph.info(node).shape == (2, 5, 10)
    assert graph.info(node).macs == 2 * 5 * model.values.numel()
    assert SPARSE_LINEAR in fxpress.ir.opinfo.ops_in("matmul")
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(graph(x), model(x))
