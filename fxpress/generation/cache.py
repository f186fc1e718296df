"""A compressed KV cache for one sequence: stored forms, exact byte counts, restore for each step.

The cache keeps, for every layer, a list of compressed segments (immutable once written) and a
float16 tail of recent tokens.  `load` takes a prompt's keys and values (layers, kv_heads, tokens,
head_dim), evicts tokens when the policy says so, and compresses all but the policy's recent window;
`append` adds decoded tokens to the tail and compresses the tail's overflow in whole groups (or, for
`streaming`, drops the oldest tokens past the window); `restore` returns float32 keys and values
(layers, 1, kv_heads, S, head_dim) for the decode step.  `stored_bytes` counts every stored byte:
codes, scales, minimums, magnitudes, retained vectors and their indices, the float16 tail.
`full_bytes` is what a float16 cache of every token seen would take.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from fxpress.generation.decoder import GenerationError
from fxpress.generation.policy import CachePolicy
from fxpress.ops.kv import (STORE_DTYPE, MergedPair, PackedBody, QuantizedGroups, Rotated, StoredTensor, merge_pair,
                            observation_scores, pack_body, quantize_groups, rotation)

APPEND_CHUNK = 64  # decoded tokens compressed at a time (fewer, larger segments)

Form = StoredTensor | QuantizedGroups | MergedPair | Rotated


@dataclass
class Segment:
    """Compressed tokens of every layer: per layer a key and a value form (a merged pair serves two
    layers: slot 0 or 1)."""

    keys: list[tuple[Form, int | None]]
    values: list[tuple[Form, int | None]]
    tokens: int

    @property
    def nbytes(self) -> int:
        unique = {id(form): form for form, _ in self.keys + self.values}
        return sum(form.nbytes for form in unique.values())

    def restore(self) -> tuple[list[Tensor], list[Tensor]]:
        done: dict[int, tuple[Tensor, Tensor]] = {}

        def one(form: Form, slot: int | None) -> Tensor:
            if slot is None:
                return form.restore()
            if id(form) not in done:
                done[id(form)] = form.restore()
            return done[id(form)][slot]

        return [one(*entry) for entry in self.keys], [one(*entry) for entry in self.values]


@dataclass
class PairStats:
    layers: tuple[int, int]
    key_distance: float = 0.0    # mean normalized angular distance between the two layers' keys
    value_distance: float = 0.0
    retained: float = 0.0        # fraction of (token, head) vectors kept unmerged (keys and values)
    tokens: int = 0


@dataclass
class CacheStats:
    evicted: int = 0             # (layer, head, token) vectors evicted
    pairs: dict[tuple[int, int], PairStats] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"evicted": self.evicted,
                "pairs": [{"layers": list(p.layers), "key_distance": round(p.key_distance, 4),
                           "value_distance": round(p.value_distance, 4), "retained": round(p.retained, 4),
                           "tokens": p.tokens} for p in self.pairs.values()]}


class CompressedCache:
    """The cache of one sequence under a bound :class:`CachePolicy` (see the module doc)."""

    def __init__(self, policy: CachePolicy, layers: int, kv_heads: int, head_dim: int,
                 tail_capacity: int | None = None):
        if policy.layers is None:
            policy = policy.bind(layers, head_dim)
        if policy.evict and policy.evict.method == "streaming" and (policy.quant or policy.merge):
            raise GenerationError(f"cache policy '{policy.text}': streaming keeps its window float16 and "
                                  "composes with neither quant nor minicache here; use snapkv to compose")
        self.policy = policy
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.segments: list[Segment] = []
        empty = torch.zeros(layers, kv_heads, 0, head_dim, dtype=STORE_DTYPE)
        self.tail_keys, self.tail_values = empty, empty.clone()
        self.seen = 0
        self.stats = CacheStats()
        self._pairs = dict(policy.merged_pairs())
        self._rotation = rotation(head_dim)
        self._tail_capacity = tail_capacity

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens per layer and head the cache restores."""
        return sum(s.tokens for s in self.segments) + self.tail_keys.shape[2]

    @property
    def stored_bytes(self) -> int:
        return sum(s.nbytes for s in self.segments) + 2 * (self.tail_keys.numel() + self.tail_values.numel())

    @property
    def full_bytes(self) -> int:
        return 2 * 2 * self.layers * self.kv_heads * self.seen * self.head_dim

    @property
    def ratio(self) -> float:
        return self.full_bytes / max(self.stored_bytes, 1)

    # -- filling -----------------------------------------------------------------------------------
    def _check(self, keys: Tensor, values: Tensor, what: str) -> None:
        expected = (self.layers, self.kv_heads, keys.shape[2] if keys.dim() == 4 else -1, self.head_dim)
        if keys.dim() != 4 or tuple(keys.shape) != expected or keys.shape != values.shape:
            raise GenerationError(f"{what}: keys and values must be (layers={self.layers}, kv_heads="
                                  f"{self.kv_heads}, tokens, head_dim={self.head_dim}); got "
                                  f"{tuple(keys.shape)} and {tuple(values.shape)}")

    def load(self, keys: Tensor, values: Tensor, queries: Tensor | None = None) -> None:
        """Store a prompt's keys and values; `queries` (layers, heads, window, head_dim) for snapkv."""
        self._check(keys, values, "cache load")
        if self.seen:
            raise GenerationError("cache load: this cache already holds a prompt; make a new cache")
        self.seen = keys.shape[2]
        evict = self.policy.evict
        if evict and evict.method == "snapkv":
            if queries is None:
                raise GenerationError(f"cache policy '{self.policy.text}': snapkv needs the prompt's last "
                                      f"{evict.window} queries (prefill with observe={evict.window})")
            keys, values = self._snapkv(keys, values, queries)
        elif evict and evict.method == "streaming":
            keys, values = self._stream(keys, values, sinks=True)
        self._absorb(keys, values, chunk=1)

    def append(self, keys: Tensor, values: Tensor) -> None:
        """Add decoded tokens' keys and values (layers, kv_heads, tokens, head_dim)."""
        self._check(keys, values, "cache append")
        self.seen += keys.shape[2]
        self._absorb(keys, values, chunk=APPEND_CHUNK)

    def _absorb(self, keys: Tensor, values: Tensor, chunk: int) -> None:
        self.tail_keys = torch.cat([self.tail_keys, keys.to(STORE_DTYPE)], dim=2)
        self.tail_values = torch.cat([self.tail_values, values.to(STORE_DTYPE)], dim=2)
        policy = self.policy
        if policy.evict and policy.evict.method == "streaming":
            self.tail_keys, self.tail_values = self._stream(self.tail_keys, self.tail_values, sinks=False)
            return
        if not (policy.quant or policy.merge):
            return
        overflow = self.tail_keys.shape[2] - policy.recent
        if overflow < chunk:
            return
        unit = self.key_unit
        count = overflow // unit * unit
        if count:
            self.segments.append(self._compress(self.tail_keys[:, :, :count].float(),
                                                self.tail_values[:, :, :count].float()))
            self.tail_keys = self.tail_keys[:, :, count:].contiguous()
            self.tail_values = self.tail_values[:, :, count:].contiguous()

    @property
    def key_unit(self) -> int:
        """Tokens compressed at a time: a key group when keys are quantized per channel, else 1."""
        quant = self.policy.quant
        return quant.key_group if quant and quant.key_axis == "channel" else 1

    # -- eviction ----------------------------------------------------------------------------------
    def _snapkv(self, keys: Tensor, values: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        evict = self.policy.evict
        tokens = keys.shape[2]
        window = min(evict.window, queries.shape[2])
        prefix = tokens - window
        keep = max(1, round(evict.keep * prefix)) if prefix > 0 else 0
        unit = self.key_unit
        if unit > 1 and keep > unit:  # whole key groups: no partial group left float16 in the tail
            keep = keep // unit * unit
        if keep >= prefix:
            return keys, values
        scores = torch.stack([observation_scores(queries[i, :, -window:], keys[i], evict.kernel, evict.score)
                              for i in range(self.layers)])                         # (layers, kv, prefix)
        scores = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)
        for first, second in self._pairs.items():  # merged layers must keep the same tokens
            scores[first] = scores[second] = scores[first] + scores[second]
        index = scores.topk(keep, dim=-1).indices.sort(dim=-1).values               # (layers, kv, keep)
        gather = index.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
        kept_k = torch.cat([keys[:, :, :prefix].gather(2, gather), keys[:, :, prefix:]], dim=2)
        kept_v = torch.cat([values[:, :, :prefix].gather(2, gather), values[:, :, prefix:]], dim=2)
        self.stats.evicted += (prefix - keep) * self.layers * self.kv_heads
        return kept_k, kept_v

    def _stream(self, keys: Tensor, values: Tensor, sinks: bool) -> tuple[Tensor, Tensor]:
        evict = self.policy.evict
        count = keys.shape[2]
        if sinks and evict.sinks:
            head = min(evict.sinks, count)
            self.segments.append(Segment([(StoredTensor.of(keys[i, :, :head]), None) for i in range(self.layers)],
                                         [(StoredTensor.of(values[i, :, :head]), None) for i in range(self.layers)],
                                         head))
            keys, values, count = keys[:, :, head:], values[:, :, head:], count - head
        if count > evict.window:
            self.stats.evicted += (count - evict.window) * self.layers * self.kv_heads
            keys, values = keys[:, :, count - evict.window:], values[:, :, count - evict.window:]
        return keys.contiguous(), values.contiguous()

    # -- merging and quantization ------------------------------------------------------------------
    def _store(self, x: Tensor, role: str) -> StoredTensor | QuantizedGroups | Rotated:
        quant = self.policy.quant
        if quant is None:
            return StoredTensor.of(x)
        if quant.rotate:
            return Rotated(self._quantize(x.float() @ self._rotation, role), self._rotation)
        return self._quantize(x, role)

    def _quantize(self, x: Tensor, role: str) -> QuantizedGroups:
        quant = self.policy.quant
        if role == "key" and quant.key_axis == "channel":  # groups run along tokens
            return quantize_groups(x, quant.key_bits, quant.key_group, axis=1)
        return quantize_groups(x, quant.key_bits if role == "key" else quant.value_bits, quant.group, axis=2)

    def _compress(self, keys: Tensor, values: Tensor) -> Segment:
        merge = self.policy.merge
        key_forms: list = [None] * self.layers
        value_forms: list = [None] * self.layers
        for first, second in self._pairs.items():
            stats = self.stats.pairs.setdefault((first, second), PairStats((first, second)))
            tokens = keys.shape[2]
            total = stats.tokens + tokens
            retained = 0.0
            if not merge.values_only:
                pair, distance = merge_pair(keys[first], keys[second], merge.t, merge.gamma,
                                            store=lambda x: self._store(x, "key"))
                key_forms[first], key_forms[second] = (pair, 0), (pair, 1)
                stats.key_distance = (stats.key_distance * stats.tokens + distance.mean().item() * tokens) / total
                retained += pair.retained_fraction
            pair, distance = merge_pair(values[first], values[second], merge.t, merge.gamma,
                                        store=lambda x: self._store(x, "value"))
            value_forms[first], value_forms[second] = (pair, 0), (pair, 1)
            stats.value_distance = (stats.value_distance * stats.tokens + distance.mean().item() * tokens) / total
            retained = (retained + pair.retained_fraction) / (1 if merge.values_only else 2)
            stats.retained = (stats.retained * stats.tokens + retained * tokens) / total
            stats.tokens = total
        for i in range(self.layers):
            if key_forms[i] is None:
                key_forms[i] = (self._store(keys[i], "key"), None)
            if value_forms[i] is None:
                value_forms[i] = (self._store(values[i], "value"), None)
        return Segment(key_forms, value_forms, keys.shape[2])

    # -- reading -----------------------------------------------------------------------------------
    @property
    def packable(self) -> str | None:
        """Why the cache cannot be handed to a graph as a packed body (None: it can)."""
        policy = self.policy
        if policy.quant is None:
            return f"cache policy '{policy.text}' stores no quantized body (a plain decode step runs it)"
        if policy.merge is not None:
            return f"cache policy '{policy.text}' merges layers; merged pairs are restored outside the graph"
        quant = policy.quant
        if quant.key_axis == "channel" and quant.key_group * quant.key_bits % 8:
            return f"key groups of {quant.key_group} tokens at {quant.key_bits} bits do not fill whole bytes"
        return None

    def packed(self) -> tuple[Tensor, ...]:
        """The compressed decode step's cache inputs: keys' and values' (codes, scale, low) in
        kv_dequantize's layout, the body's slots (1: a token), the float16 tails padded to
        `tail_capacity` (layers, 1, heads, capacity, head_dim) and the tail's length."""
        if self.packable:
            raise GenerationError(self.packable)
        if not self.segments:
            k_body, v_body = self._empty_bodies()
            valid = 0
        else:
            valid = 1
            def inner(form):
                return form.inner if isinstance(form, Rotated) else form

            layers_k = [[inner(seg.keys[i][0]) for seg in self.segments] for i in range(self.layers)]
            layers_v = [[inner(seg.values[i][0]) for seg in self.segments] for i in range(self.layers)]
            unit = self.key_unit
            k_body = pack_body(layers_k, self.kv_heads, self.head_dim, unit)
            v_body = pack_body(layers_v, self.kv_heads, self.head_dim, unit)
        capacity = self.tail_capacity
        length = self.tail_keys.shape[2]
        if length > capacity:
            raise GenerationError(f"cache tail of {length} tokens exceeds its capacity {capacity}")
        pad = (0, 0, 0, capacity - length)
        slots = torch.full((k_body.tokens,), valid, dtype=torch.uint8)
        return (*k_body.inputs(), *v_body.inputs(), slots, F.pad(self.tail_keys, pad).unsqueeze(1),
                F.pad(self.tail_values, pad).unsqueeze(1), torch.tensor([length]))

    @property
    def tail_capacity(self) -> int:
        """The most tokens the float16 tail holds between compressions (its padded size in a graph)."""
        if self._tail_capacity is not None:
            return self._tail_capacity
        return self.policy.recent + max(APPEND_CHUNK, self.key_unit)

    def _empty_bodies(self):
        """Stand-in bodies of one group of zeros (their slots say they hold no token): a graph
        cannot take tensors of no elements everywhere."""
        quant = self.policy.quant
        unit = self.key_unit
        empty = torch.zeros(self.layers, self.kv_heads, unit, self.head_dim)
        k = pack_body([[self._quantize(e, "key")] for e in empty], self.kv_heads, self.head_dim, unit)
        v = pack_body([[self._quantize(e, "value")] for e in empty], self.kv_heads, self.head_dim, unit)
        return k, v

    def compressed_step_options(self) -> dict:
        """The CompressedDecodeStep arguments that match this cache's stored form."""
        quant = self.policy.quant
        per_channel = quant.key_axis == "channel"
        return {"key_bits": quant.key_bits, "key_group": quant.key_group if per_channel else quant.group,
                "keys_per_channel": per_channel, "value_bits": quant.value_bits, "value_group": quant.group,
                "rotation": self._rotation if quant.rotate else None}

    def restore(self) -> tuple[Tensor, Tensor]:
        """float32 keys and values (layers, 1, kv_heads, length, head_dim) for the decode step."""
        parts_k, parts_v = [], []
        for segment in self.segments:
            k, v = segment.restore()
            parts_k.append(torch.stack(k))
            parts_v.append(torch.stack(v))
        parts_k.append(self.tail_keys.float())
        parts_v.append(self.tail_values.float())
        return torch.cat(parts_k, dim=2).unsqueeze(1), torch.cat(parts_v, dim=2).unsqueeze(1)
