"""Compressed KV forms: quantized groups, merged layer pairs, observation scores; bytes by hand."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpress.ops.kv import (MergedPair, QuantizedGroups, StoredTensor, angular_distance, merge_pair,
                            observation_scores, quantize_groups, retention_mask, slerp_directions)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [1, 2])
def test_quantized_groups_error_is_within_half_a_step(bits, axis):
    torch.manual_seed(bits + axis)
    x = torch.randn(3, 64, 32)
    q = quantize_groups(x, bits, 16, axis)
    restored = q.restore()
    assert restored.shape == x.shape
    groups = x.movedim(axis, -1).reshape(-1, 16)
    step = ((groups.amax(-1) - groups.amin(-1)) / (2 ** bits - 1)).max().item()
    assert (restored - x).abs().max().item() <= step / 2 + 2e-3 * x.abs().max().item()


def test_quantized_groups_bytes_by_hand():
    # 3 heads x 64 tokens x 32 channels, 4 bits, groups of 16 along tokens: 6144 values -> 3072 code
    # bytes; 6144 / 16 = 384 groups, each a float16 scale and minimum (4 bytes) -> 1536
    q = quantize_groups(torch.randn(3, 64, 32), 4, 16, axis=1)
    assert q.nbytes == 3072 + 1536
    # 2 bits, groups of 32 along channels: 1536 code bytes + 192 groups * 4
    assert quantize_groups(torch.randn(3, 64, 32), 2, 32, axis=2).nbytes == 1536 + 768
    assert StoredTensor.of(torch.randn(3, 64, 32)).nbytes == 3 * 64 * 32 * 2


def test_quantized_groups_bad_input():
    with pytest.raises(ValueError, match="bits must be one of 2, 4, 8"):
        quantize_groups(torch.randn(2, 8, 8), 3, 8, axis=1)
    with pytest.raises(ValueError, match="group 5 must divide"):
        quantize_groups(torch.randn(2, 8, 8), 4, 5, axis=1)


def test_constant_group_restores_exactly():
    x = torch.full((1, 8, 4), 0.25)
    assert torch.equal(quantize_groups(x, 2, 8, axis=1).restore(), x)


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 3), tokens=st.integers(1, 12), dim=st.sampled_from([4, 8, 16]),
       t=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_merge_restore_round_trip(heads, tokens, dim, t, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(heads, tokens, dim, generator=gen)
    b = torch.randn(heads, tokens, dim, generator=gen)
    # gamma = 1 retains every vector: the pair restores the float16 inputs exactly
    pair, _ = merge_pair(a, b, t, gamma=1.0, store=StoredTensor.of)
    ra, rb = pair.restore()
    assert torch.equal(ra, a.half().float()) and torch.equal(rb, b.half().float())
    # gamma = 0.3 retains the most distant vectors exactly, merges the rest
    pair, distance = merge_pair(a, b, t, gamma=0.3, store=StoredTensor.of)
    ra, rb = pair.restore()
    keep = retention_mask(distance, 0.3)
    assert torch.equal(ra[keep], a[keep].half().float()) and torch.equal(rb[keep], b[keep].half().float())
    # every restored vector keeps its own magnitude (float16), merged or not
    assert torch.allclose(ra.norm(dim=-1), a.norm(dim=-1), rtol=2e-3, atol=1e-3)
    assert torch.allclose(rb.norm(dim=-1), b.norm(dim=-1), rtol=2e-3, atol=1e-3)
    # and a merged vector's direction is the SLERP of the two
    merged = ~keep
    direction = slerp_directions(a, b, t)
    assert torch.allclose(torch.nn.functional.normalize(ra[merged], dim=-1), direction[merged], atol=2e-3)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(2, 10), seed=st.integers(0, 10_000))
def test_identical_layers_merge_losslessly(tokens, seed):
    a = torch.randn(2, tokens, 8, generator=torch.Generator().manual_seed(seed))
    pair, distance = merge_pair(a, a.clone(), 0.6, gamma=0.05)
    assert distance.max().item() < 1e-3
    ra, rb = pair.restore()
    assert torch.allclose(ra, a, atol=5e-3, rtol=5e-3) and torch.allclose(rb, a, atol=5e-3, rtol=5e-3)


def test_slerp_endpoints_and_distance():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert torch.allclose(slerp_directions(a, b, 0.0), torch.tensor([[1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(slerp_directions(a, b, 1.0), torch.tensor([[0.0, 1.0]]), atol=1e-6)
    half = math.sqrt(0.5)
    assert torch.allclose(slerp_directions(a, b, 0.5), torch.tensor([[half, half]]), atol=1e-6)
    assert angular_distance(a, b).item() == pytest.approx(0.5)
    assert angular_distance(a, -a).item() == pytest.approx(1.0)


def test_merged_pair_bytes_by_hand():
    torch.manual_seed(0)
    a, b = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    pair, _ = merge_pair(a, b, 0.6, gamma=0.0)
    # direction 2*10*8 float16 + magnitudes 2*2*10 float16, nothing retained
    assert pair.retained.numel() == 0 and pair.nbytes == 160 * 2 + 40 * 2
    pair, _ = merge_pair(a, b, 0.6, gamma=0.5)
    r = pair.retained.numel()
    assert r > 0 and pair.nbytes == 160 * 2 + 40 * 2 + r * 4 + 2 * r * 8 * 2
    assert isinstance(pair, MergedPair) and pair.retained_fraction == pytest.approx(r / 20)


def test_retention_grows_with_gamma():
    distance = torch.rand(3, 200, generator=torch.Generator().manual_seed(1))
    counts = [int(retention_mask(distance, g).sum()) for g in (0.0, 0.05, 0.3, 1.0)]
    assert counts[0] == 0 and counts == sorted(counts) and counts[1] < counts[2] < counts[3] == 600
    with pytest.raises(ValueError, match="gamma"):
        retention_mask(distance, 1.5)


def test_observation_scores_follow_attention():
    # 1 KV head, 2 query heads; the window's queries point at token 3 of the prefix
    keys = torch.zeros(1, 10, 4)
    keys[0, 3] = torch.tensor([5.0, 0, 0, 0])
    queries = torch.tensor([1.0, 0, 0, 0]).expand(2, 2, 4)
    scores = observation_scores(queries, keys, kernel=1)
    assert scores.shape == (1, 8) and scores[0].argmax().item() == 3
    pooled = observation_scores(queries, keys, kernel=3)
    assert pooled[0, 2] == pooled[0, 3] == pooled[0, 4]   # neighbours of an important token survive
    assert observation_scores(queries, keys, kernel=1, reduce="max")[0].argmax().item() == 3


def test_quantized_groups_keep_their_layout():
    q = quantize_groups(torch.randn(2, 32, 8), 4, 8, axis=1)
    assert isinstance(q, QuantizedGroups) and q.codes.dtype == torch.uint8
    assert q.scale.dtype == q.low.dtype == torch.float16 and q.codes.shape == (16, 16)


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), per_channel=st.booleans(), segments=st.lists(st.integers(1, 3), min_size=1,
       max_size=3), seed=st.integers(0, 1000))
def test_packed_body_restores_like_its_segments(bits, per_channel, segments, seed):
    """kv_dequantize over pack_body's layout equals restoring each layer's segments and joining them."""
    from fxpress.ops.kv import KV_DEQUANTIZE, pack_body

    layers, heads, dim, unit = 2, 2, 8, 4
    gen = torch.Generator().manual_seed(seed)
    forms = [[quantize_groups(torch.randn(heads, n * unit, dim, generator=gen), bits, unit if per_channel else 4,
                              axis=1 if per_channel else 2) for n in segments] for _ in range(layers)]
    body = pack_body(forms, heads, dim, unit)
    tokens = sum(segments) * unit
    restored = KV_DEQUANTIZE(*body.inputs(), torch.ones(tokens, dtype=torch.uint8), bits, body.group, layers,
                             heads, dim, per_channel)
    expected = torch.stack([torch.cat([f.restore() for f in layer], dim=1) for layer in forms]).unsqueeze(1)
    assert torch.equal(restored, expected)
    assert body.nbytes == sum(f.nbytes for layer in forms for f in layer)
    with pytest.raises(ValueError, match="slots has"):
        KV_DEQUANTIZE(*body.inputs(), torch.ones(tokens + 1, dtype=torch.uint8), bits, body.group, layers, heads,
                      dim, per_channel)
