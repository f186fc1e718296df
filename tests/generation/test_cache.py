"""Compressed caches: zero compression is exact, stored bytes by hand, eviction picks what it should."""
from __future__ import annotations

import pytest
import torch

from fxpress.generation import CompressedCache, GenerationError, parse_policy

LAYERS, HEADS, DIM = 4, 2, 16


def kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(LAYERS, HEADS, tokens, DIM, generator=gen),
            torch.randn(LAYERS, HEADS, tokens, DIM, generator=gen))


def cache(policy: str, layers: int = LAYERS) -> CompressedCache:
    return CompressedCache(parse_policy(policy).bind(layers, DIM), layers, HEADS, DIM)


def queries(tokens: int, window: int) -> torch.Tensor:
    return torch.randn(LAYERS, HEADS * 2, window, DIM, generator=torch.Generator().manual_seed(7))


def loaded(policy: str, tokens: int = 40, observe: int = 32) -> CompressedCache:
    c = cache(policy)
    k, v = kv(tokens)
    c.load(k, v, queries(tokens, observe) if parse_policy(policy).observe else None)
    return c


def test_full_cache_is_float16_of_every_token():
    k, v = kv(40)
    c = loaded("full")
    rk, rv = c.restore()
    assert rk.shape == (LAYERS, 1, HEADS, 40, DIM)
    assert torch.equal(rk[:, 0], k.half().float()) and torch.equal(rv[:, 0], v.half().float())
    assert c.stored_bytes == c.full_bytes == 2 * 2 * LAYERS * HEADS * 40 * DIM and c.ratio == 1.0


@pytest.mark.parametrize("policy", [
    "quant{bits=2,window=64}",           # everything inside the float16 window
    "snapkv{keep=1.0}",                  # keeps every token
    "streaming{sinks=4,window=64}",      # the window holds the whole prompt
    "minicache{gamma=1.0}",              # every vector retained unmerged
    "snapkv{keep=1.0}+quant{bits=4,window=64}",
])
def test_each_policy_at_zero_compression_is_exact(policy):
    full = loaded("full").restore()
    c = loaded(policy)
    restored = c.restore()
    assert torch.equal(restored[0], full[0]) and torch.equal(restored[1], full[1])
    k, v = kv(3, seed=5)
    for one in (loaded("full"), c):
        one.append(k, v)
    assert torch.equal(c.restore()[0], loaded_after_append("full", k, v)[0])


def loaded_after_append(policy, k, v):
    c = loaded(policy)
    c.append(k, v)
    return c.restore()


def test_quantized_cache_bytes_by_hand():
    # 40 tokens, window 8: 32 tokens quantized (kgroup 8 along tokens), 8 float16
    c = loaded("quant{bits=4,group=8,window=8}")
    per_layer_keys = HEADS * 32 * DIM // 2 + (HEADS * DIM * 32 // 8) * 4      # codes + scale/min per group
    per_layer_values = HEADS * 32 * DIM // 2 + (HEADS * 32 * DIM // 8) * 4
    tail = 2 * LAYERS * HEADS * 8 * DIM * 2
    assert c.stored_bytes == LAYERS * (per_layer_keys + per_layer_values) + tail
    assert c.full_bytes == 2 * 2 * LAYERS * HEADS * 40 * DIM
    assert c.length == 40
    k, v = kv(40)
    rk, _ = c.restore()
    assert (rk[:, 0, :, 32:] == k[:, :, 32:].half().float()).all()          # the window is exact
    assert 0 < (rk[:, 0, :, :32] - k[:, :, :32]).abs().max() < 0.6          # the body is 4-bit


def test_minicache_bytes_by_hand_and_pairs():
    c = loaded("minicache{start=2,gamma=0.0}", tokens=10)
    assert c.policy.merged_pairs() == [(2, 3)]
    dense = 2 * 2 * HEADS * 10 * DIM * 2                     # layers 0, 1: keys and values float16
    merged = 2 * (HEADS * 10 * DIM * 2 + 2 * HEADS * 10 * 2)   # keys and values: a direction + 2 magnitudes
    assert c.stored_bytes == dense + merged
    stats = c.stats.as_dict()["pairs"][0]
    assert stats["layers"] == [2, 3] and stats["retained"] == 0.0 and 0.3 < stats["key_distance"] < 0.7
    rk, rv = c.restore()
    k, v = kv(10)
    assert torch.equal(rk[:2, 0], k[:2].half().float())
    assert torch.allclose(rk[2:, 0].norm(dim=-1), k[2:].norm(dim=-1), rtol=1e-2)  # magnitudes restored


def test_minicache_gamma_retains_more_and_costs_bytes():
    sizes = [loaded(f"minicache{{start=0,gamma={g}}}", tokens=64).stored_bytes for g in (0.0, 0.05, 0.5)]
    assert sizes[0] < sizes[1] < sizes[2]
    errors = []
    k, _ = kv(64)
    for g in (0.0, 0.5):
        rk, _ = loaded(f"minicache{{start=0,gamma={g}}}", tokens=64).restore()
        errors.append((rk[:, 0] - k).norm().item())
    assert errors[1] < errors[0]


def test_merge_values_keeps_keys_apart():
    c = loaded("merge-values{start=0,gamma=0.0}", tokens=10)
    k, _ = kv(10)
    assert torch.equal(c.restore()[0][:, 0], k.half().float())
    assert c.stored_bytes < loaded("full", tokens=10).stored_bytes


def test_snapkv_keeps_the_attended_tokens():
    c = cache("snapkv{keep=0.25,window=4,kernel=1}")
    k, v = kv(20)
    q = torch.zeros(LAYERS, HEADS * 2, 4, DIM)
    k[:, :, 5] = 0.0
    k[:, :, 5, 0] = 20.0       # token 5 is what the window's queries look at
    q[..., 0] = 1.0
    c.load(k, v, q)
    rk, _ = c.restore()
    assert rk.shape[3] == 4 + 4   # keep 0.25 of the 16-token prefix, + the 4-token window
    assert (rk[:, 0, :, :, 0] == 20.0).any(-1).all()
    assert c.stats.evicted == LAYERS * HEADS * 12


def test_streaming_keeps_sinks_and_window_while_decoding():
    c = loaded("streaming{sinks=2,window=8}", tokens=30)
    assert c.length == 10
    k, v = kv(5, seed=3)
    c.append(k, v)
    rk, _ = c.restore()
    assert c.length == 10 and torch.equal(rk[:, 0, :, -5:], k.half().float())
    assert c.seen == 35 and c.ratio == pytest.approx(35 / 10)


def test_decoded_tokens_are_compressed_in_groups():
    c = loaded("quant{bits=4,group=8,window=8}")
    before = len(c.segments)
    for step in range(70):
        k, v = kv(1, seed=100 + step)
        c.append(k, v)
    assert len(c.segments) == before + 1 and c.length == 110
    assert c.tail_keys.shape[2] < 8 + 64 + 8


@pytest.mark.parametrize("policy, message", [
    ("quant{bits=3}", "bits=3 is not supported; cache bits are one of 2, 4, 8"),
    ("quant{kbits=16}", "kbits=16 is not supported"),
    ("minicache{start=3}", "start=3 leaves no pair"),
    ("snapkv{keep=0}", "keep=0.0 must lie in"),
    ("snapkv{keep=0.5}+streaming", "two eviction components"),
    ("lru{size=3}", "unknown component 'lru'"),
    ("quant{bitz=4}", "unknown option(s) bitz"),
    ("quant{group=5}", "group 5 must divide the head dim 16"),
    ("full+quant", "'full' stands alone"),
    ("streaming+quant", "streaming keeps its window float16"),
])
def test_bad_policies_get_one_clear_error(policy, message):
    with pytest.raises(GenerationError) as err:
        cache(policy)
    assert message in str(err.value) and policy.split("{")[0] in str(err.value)


def test_snapkv_without_queries_says_how():
    with pytest.raises(GenerationError, match="observe=32"):
        cache("snapkv").load(*kv(40))
