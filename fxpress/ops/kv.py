"""Compressed KV-cache forms: group-quantized tensors, SLERP-merged layer pairs, observation scores.

A decoder's cache holds, per layer, keys K and values V of shape (kv_heads, tokens, head_dim).  The
forms here are the stored representations the cache policies of :mod:`fxpress.generation` build, each
with a reference implementation (store, restore) and its exact stored bytes:

    StoredTensor          a tensor kept as float16                          2 bytes per value
    QuantizedGroups       `bits` in {2, 4, 8} codes, asymmetric, one float16 scale and one float16
                          minimum per group of `group` values along `axis`   bits/8 per value
                          + 4 bytes per group
    MergedPair            MiniCache (Liu et al., 2024): two adjacent layers' vectors x1, x2 of a
                          token and head become one direction e = slerp(x1/|x1|, x2/|x2|, t) and
                          two float16 magnitudes; restore: x_i ~ |x_i| e.  Tokens whose normalized
                          angular distance d = arccos(cos(x1, x2)) / pi is large are retained
                          unmerged: float16 copies of both vectors + an int32 index each.
    Rotated               any of the above of x @ R, R an orthogonal constant of the head dim
                          (Hadamard): no stored bytes of its own
    fxpress::kv_dequantize  the op a compressed decode-step graph restores a quantized body with
                          (all layers at once; layout below `PackedBody`)

Keys are quantized per channel (groups run along tokens) and values per token (groups run along
channels), as in KIVI (Liu et al., 2024): key outliers sit in fixed channels, value errors stay
within a token.  `observation_scores` is SnapKV's (Li et al., 2024) token importance: the attention
the last `window` queries of the prompt pay to each earlier token, summed over those queries and the
query heads sharing a KV head, then max-pooled along tokens so neighbours of important tokens survive.

Everything here runs on one sequence (no batch axis); stored tensors are float16 whatever the
model's dtype, and restored tensors come back as float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fxpress.ir.opinfo import OpInfo, define_op
from fxpress.ops.quant import decode, encode, group_params, pack_codes, packed_bytes, unpack_codes

KV_BITS = (2, 4, 8)
STORE_DTYPE = torch.float16
INDEX_BYTES = 4  # retained-token indices are int32


def check_kv_bits(bits: int) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"cache bits must be one of {', '.join(map(str, KV_BITS))}, got {bits}")


def float_bytes(t: Tensor) -> int:
    """Stored bytes of `t` kept as float16."""
    return t.numel() * 2


@dataclass(frozen=True)
class StoredTensor:
    """A cache tensor kept as float16."""

    value: Tensor

    @classmethod
    def of(cls, x: Tensor) -> StoredTensor:
        return cls(x.to(STORE_DTYPE))

    @property
    def nbytes(self) -> int:
        return float_bytes(self.value)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def restore(self) -> Tensor:
        return self.value.float()


@dataclass(frozen=True)
class QuantizedGroups:
    """A tensor quantized in groups of `group` consecutive values along `axis` (see the module doc)."""

    codes: Tensor   # uint8 (rows, packed_bytes(length, bits)); rows = the other axes, flattened
    scale: Tensor   # float16 (rows, length / group)
    low: Tensor     # float16 (rows, length / group)
    shape: tuple[int, ...]
    axis: int
    bits: int
    group: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + float_bytes(self.scale) + float_bytes(self.low)

    def restore(self) -> Tensor:
        moved = list(self.shape)
        length = moved.pop(self.axis)
        rows = self.codes.shape[0]
        q = unpack_codes(self.codes, self.bits, length).view(rows, length // self.group, self.group)
        return decode_groups(q, self.scale, self.low, self.bits).reshape(*moved, length).movedim(-1, self.axis)


def decode_groups(q: Tensor, scale: Tensor, low: Tensor, bits: int) -> Tensor:
    """float32 values of codes `q` (..., group) under their groups' float16 scale and minimum (...)."""
    return decode(q, scale.float().unsqueeze(-1), low.float().unsqueeze(-1), bits, "float")


def quantize_groups(x: Tensor, bits: int, group: int, axis: int) -> QuantizedGroups:
    """Quantize `x` in groups of `group` along `axis` (asymmetric, min/max range, float16 parameters)."""
    check_kv_bits(bits)
    axis = axis % x.dim()
    length = x.shape[axis]
    if group < 1 or length % group:
        raise ValueError(f"group {group} must divide the quantized axis ({length} values)")
    moved = x.float().movedim(axis, -1)
    rows = moved.numel() // length if length else 0
    groups = moved.reshape(rows, length // group, group)
    scale, low = group_params(groups, bits, "float")
    scale, low = scale.to(STORE_DTYPE), low.to(STORE_DTYPE)  # encode against the stored parameters
    q = encode(groups, scale.float().unsqueeze(-1), low.float().unsqueeze(-1), bits, "float")
    codes = pack_codes(q.reshape(rows, length).to(torch.uint8), bits) if rows else \
        torch.zeros(0, packed_bytes(length, bits), dtype=torch.uint8)
    return QuantizedGroups(codes, scale, low, tuple(x.shape), axis, bits, group)


# -- rotation before quantization ------------------------------------------------------------------
def rotation(dim: int) -> Tensor:
    """An orthogonal (dim, dim) matrix: the normalized Walsh-Hadamard matrix when dim is a power of two,
    else a fixed random orthogonal one (QR of a seeded Gaussian).  Rotating head vectors by it spreads
    a few large channels over all of them, so fewer bits quantize them (as QuaRot does for caches)."""
    if dim & (dim - 1) == 0:
        h = torch.ones(1, 1)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(dim)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(dim)))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@dataclass(frozen=True)
class Rotated:
    """A stored form of x @ R; restores x.  R is a constant of the head dim (:func:`rotation`), not stored."""

    inner: StoredTensor | QuantizedGroups
    matrix: Tensor

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def restore(self) -> Tensor:
        return self.inner.restore() @ self.matrix.T


# -- cross-layer merging (MiniCache) ---------------------------------------------------------------
def angular_distance(a: Tensor, b: Tensor) -> Tensor:
    """arccos(cos(a, b)) / pi along the last axis: 0 for parallel vectors, 1 for opposite ones."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


def slerp_directions(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Unit vector t of the way from a/|a| to b/|b| along the great circle (linear where they coincide)."""
    ua = F.normalize(a.float(), dim=-1, eps=1e-12)
    ub = F.normalize(b.float(), dim=-1, eps=1e-12)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    near = sin < 1e-6
    wa = torch.where(near, torch.full_like(theta, 1.0 - t), torch.sin((1.0 - t) * theta) / torch.where(near, 1.0, sin))
    wb = torch.where(near, torch.full_like(theta, t), torch.sin(t * theta) / torch.where(near, 1.0, sin))
    return F.normalize(wa * ua + wb * ub, dim=-1, eps=1e-12)


@dataclass(frozen=True)
class MergedPair:
    """Two adjacent layers' (heads, tokens, dim) tensors stored as one direction + two magnitudes."""

    direction: StoredTensor | QuantizedGroups   # (heads, tokens, dim), unit vectors
    norms: Tensor                               # float16 (2, heads, tokens)
    retained: Tensor                            # int32 (r,): flat (head * tokens + token) indices
    retained_values: Tensor                     # float16 (2, r, dim)

    @property
    def nbytes(self) -> int:
        return (self.direction.nbytes + float_bytes(self.norms) + self.retained.numel() * INDEX_BYTES
                + float_bytes(self.retained_values))

    @property
    def retained_fraction(self) -> float:
        heads, tokens = self.norms.shape[1:]
        return self.retained.numel() / max(heads * tokens, 1)

    def restore(self) -> tuple[Tensor, Tensor]:
        direction = self.direction.restore()
        heads, tokens, dim = direction.shape
        out = []
        for i in range(2):
            x = (direction * self.norms[i].float().unsqueeze(-1)).reshape(heads * tokens, dim)
            if self.retained.numel():
                x = x.index_copy(0, self.retained.long(), self.retained_values[i].float())
            out.append(x.reshape(heads, tokens, dim))
        return out[0], out[1]


def retention_mask(distance: Tensor, gamma: float) -> Tensor:
    """Tokens kept unmerged: per head, d > d_min + (1 - gamma) (d_max - d_min) (`distance`: heads, tokens).

    gamma = 0 retains nothing, gamma = 1 retains every token (no merging at all).  See docs/kv.md for
    how this reads the paper.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if gamma == 0.0 or distance.shape[-1] == 0:
        return torch.zeros_like(distance, dtype=torch.bool)
    if gamma == 1.0:
        return torch.ones_like(distance, dtype=torch.bool)
    low, high = distance.amin(-1, keepdim=True), distance.amax(-1, keepdim=True)
    return distance > low + (1.0 - gamma) * (high - low)


def merge_pair(a: Tensor, b: Tensor, t: float, gamma: float,
               store=StoredTensor.of) -> tuple[MergedPair, Tensor]:
    """Merge layer tensors `a`, `b` (heads, tokens, dim); `store` keeps the direction (float16 or
    quantized).  Returns the pair and the (heads, tokens) angular distances."""
    if a.shape != b.shape:
        raise ValueError(f"merged layers must hold the same cache shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    heads, tokens, dim = a.shape
    distance = angular_distance(a, b)
    keep = retention_mask(distance, gamma).reshape(-1)
    retained = keep.nonzero().flatten().to(torch.int32)
    values = torch.stack([a.reshape(-1, dim)[keep], b.reshape(-1, dim)[keep]]).to(STORE_DTYPE)
    norms = torch.stack([a.float().norm(dim=-1), b.float().norm(dim=-1)]).to(STORE_DTYPE)
    return MergedPair(store(slerp_directions(a, b, t)), norms, retained, values), distance


# -- SnapKV observation scores ---------------------------------------------------------------------
def observation_scores(queries: Tensor, keys: Tensor, kernel: int = 7, reduce: str = "sum") -> Tensor:
    """Importance (kv_heads, prefix) of the keys before the observation window.

    queries: (query_heads, window, dim) - the last `window` queries of the prompt (after rotary);
    keys: (kv_heads, tokens, dim) - all the prompt's keys; the window's own keys are the last `window`.
    reduce: "sum" (SnapKV) or "max" over the window's queries and the query heads of a KV head.
    """
    q_heads, window, dim = queries.shape
    kv_heads, tokens, _ = keys.shape
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not share {kv_heads} KV heads evenly")
    group = q_heads // kv_heads
    q = queries.float().reshape(kv_heads, group * window, dim)
    scores = q @ keys.float().transpose(-1, -2) / math.sqrt(dim)            # (kv, group*window, tokens)
    row = torch.arange(window).repeat(group).unsqueeze(-1)                  # query i sits at tokens-window+i
    allowed = torch.arange(tokens).unsqueeze(0) <= row + tokens - window
    attn = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    prefix = attn[..., :tokens - window]
    prefix = prefix.sum(1) if reduce == "sum" else prefix.amax(1)           # (kv, prefix)
    if kernel > 1 and prefix.shape[-1]:
        prefix = F.max_pool1d(prefix.unsqueeze(1), kernel, stride=1, padding=kernel // 2).squeeze(1)
    return prefix


# -- the op: a packed cache body restored inside a graph -------------------------------------------
# The body of a quantized cache, all layers at once: L layers, H KV heads, D head dim, G groups of Tg
# tokens (S = G * Tg tokens).  Every input has the group count G as one axis, so a graph whose cache
# grows has one dynamic dim:
#   per channel (keys):  codes uint8 (L*H*D, G, Tg*bits/8), scale and low float16 (L*H*D, G)
#   per token:           codes uint8 (L*H, G, Tg, D*bits/8), scale and low float16 (L*H, G, Tg, D/group)
# kv_dequantize restores it as float32 (L, 1, H, S, D), the decode step's past.  `group` is Tg per
# channel and channels per group per token.  `slots` is any (S,) tensor: its length is the token count,
# so a graph's token axis is one symbol of its own (TVM cannot split a length like 8 * G + 73 where it
# can split S + 73).  MACs: none (elementwise); it reads codes + scale + low.
def body_tokens(codes: Tensor, group: int, per_channel: bool) -> int:
    """Tokens of a packed body: G groups of `group` tokens per channel, or of codes.shape[2] per token."""
    return codes.shape[1] * (group if per_channel else codes.shape[2])


def kv_dequantize_reference(codes: Tensor, scale: Tensor, low: Tensor, slots: Tensor, bits: int, group: int,
                            layers: int, heads: int, head_dim: int, per_channel: bool) -> Tensor:
    tokens = body_tokens(codes, group, per_channel)
    if slots.shape[0] != tokens:
        raise ValueError(f"kv_dequantize: slots has {slots.shape[0]} entries for a body of {tokens} tokens")
    if per_channel:
        rows, groups, width = codes.shape
        q = unpack_codes(codes.reshape(rows * groups, width), bits, group).view(rows, groups, group)
        return decode_groups(q, scale, low, bits).reshape(layers, heads, head_dim, tokens).permute(0, 1, 3, 2).unsqueeze(1)
    rows, groups, per_group, width = codes.shape
    q = unpack_codes(codes.reshape(-1, width), bits, head_dim).view(rows, groups, per_group, head_dim // group, group)
    return decode_groups(q, scale, low, bits).reshape(layers, heads, groups * per_group, head_dim).unsqueeze(1)


def _kv_dequantize(codes, scale, low, slots, bits, group, layers, heads, head_dim, per_channel):
    check_kv_bits(bits)
    with torch.no_grad():
        return kv_dequantize_reference(codes, scale, low, slots, bits, group, layers, heads, head_dim, per_channel)


def _kv_dequantize_fake(codes, scale, low, slots, bits, group, layers, heads, head_dim, per_channel):
    return scale.new_empty(layers, 1, heads, slots.shape[0], head_dim, dtype=torch.float32)


_LIBRARY = torch.library.Library("fxpress", "FRAGMENT")
_LIBRARY.define("kv_dequantize(Tensor codes, Tensor scale, Tensor low, Tensor slots, int bits, int group, int layers, "
                "int heads, int head_dim, bool per_channel) -> Tensor")
_LIBRARY.impl("kv_dequantize", _kv_dequantize, "CompositeExplicitAutograd")
torch.library.register_fake("fxpress::kv_dequantize", _kv_dequantize_fake, lib=_LIBRARY)
KV_DEQUANTIZE = torch.ops.fxpress.kv_dequantize.default

define_op(OpInfo(KV_DEQUANTIZE, "elementwise",
                 doc="a quantized KV-cache body (codes, float16 scale and minimum per group) as float32 "
                     "(layers, 1, heads, tokens, head_dim)"))


@dataclass(frozen=True)
class PackedBody:
    """One of keys or values of a cache body in kv_dequantize's layout (see above)."""

    codes: Tensor
    scale: Tensor
    low: Tensor
    bits: int
    group: int
    per_channel: bool

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + float_bytes(self.scale) + float_bytes(self.low)

    @property
    def tokens(self) -> int:
        return body_tokens(self.codes, self.group, self.per_channel)

    def inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.codes, self.scale, self.low


def pack_body(layers_forms: list[list[QuantizedGroups]], heads: int, head_dim: int, unit: int = 1) -> PackedBody:
    """kv_dequantize's layout of a body held as per-layer lists of segments (QuantizedGroups of shape
    (heads, tokens, head_dim), all quantized alike: along tokens (axis 1) or channels (axis 2)).
    Per token, tokens are grouped `unit` at a time (the key group, so keys and values share G)."""
    first = layers_forms[0][0]
    per_channel = first.axis == 1
    codes, scales, lows = [], [], []
    for forms in layers_forms:
        layer_codes, layer_scales, layer_lows = [], [], []
        for form in forms:
            if (form.axis, form.bits, form.group) != (first.axis, first.bits, first.group):
                raise ValueError("a packed cache body needs every segment quantized alike")
            tokens = form.shape[1]
            if per_channel:  # rows (heads * head_dim), tokens along the codes: split into groups
                layer_codes.append(form.codes.view(heads * head_dim, tokens // form.group, -1))
                layer_scales.append(form.scale)
                layer_lows.append(form.low)
            else:           # rows (heads * tokens): one group of tokens per token
                layer_codes.append(form.codes.view(heads, tokens // unit, unit, -1))
                layer_scales.append(form.scale.view(heads, tokens // unit, unit, -1))
                layer_lows.append(form.low.view(heads, tokens // unit, unit, -1))
        codes.append(torch.cat(layer_codes, 1))
        scales.append(torch.cat(layer_scales, 1))
        lows.append(torch.cat(layer_lows, 1))
    return PackedBody(torch.cat(codes), torch.cat(scales), torch.cat(lows), first.bits, first.group, per_channel)
