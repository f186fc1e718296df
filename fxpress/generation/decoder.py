"""A decoder's forward with the KV cache as explicit tensors: the graphs generation captures and compiles.

    step = DecoderStep(hf_causal_lm)
    logits, keys, values = step(input_ids, positions, past_keys, past_values)

`input_ids` and `positions` are (batch, T); the past is (layers, batch, kv_heads, S, head_dim), keys
after rotary; the outputs are the logits (batch, T, vocab) and the T new tokens' keys and values,
(layers, batch, kv_heads, T, head_dim).
Each layer attends over ``cat(past, new)`` with a causal mask inside the new tokens, so one module
serves prefill (S = 0 past or `prefill=True`, no past inputs), chunked scoring and one-token decode.
Positions are explicit: a cache that evicted tokens still feeds the true positions.

With ``observe=w`` the module also returns each layer's last `w` queries (batch, heads, w, head_dim),
after rotary: what SnapKV scores the prompt's tokens with.

Decoders of the LLaMA family are supported (model_type llama, mistral without a sliding window,
qwen2, qwen3); anything else is a GenerationError naming the model type.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from fxpress.errors import GenerationError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside `model` (a zoo wrapper's ``.model`` or the model itself)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "lm_head"):
        return inner
    return model


def check_decoder(model: nn.Module, what: str = "generation") -> nn.Module:
    """The supported causal LM in `model`, or a GenerationError saying why it is not one."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or not hasattr(lm, "lm_head"):
        raise GenerationError(f"{what} needs a Hugging Face causal language model (a decoder with an "
                              f"lm_head); got {type(model).__name__}. Encoder-only models (BERT, MiniLM, "
                              "ViT) have no KV cache to generate with")
    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False) or kind not in SUPPORTED:
        raise GenerationError(f"{what}: model type '{kind}' is not supported; supported decoders: "
                              f"{', '.join(SUPPORTED)}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and kind == "mistral":
        raise GenerationError(f"{what}: sliding-window attention (mistral, window {config.sliding_window}) "
                              "is not supported")
    return lm


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderStep(nn.Module):
    """The causal LM's forward with an explicit cache (see the module doc); shares the LM's weights."""

    def __init__(self, model: nn.Module, *, prefill: bool = False, observe: int = 0):
        super().__init__()
        lm = check_decoder(model)
        config = lm.config
        self.embed = lm.model.embed_tokens
        self.layers = lm.model.layers
        self.norm = lm.model.norm
        self.lm_head = lm.lm_head
        self.rotary = lm.model.rotary_emb
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.prefill = prefill
        self.observe = observe
        self.max_positions = getattr(config, "max_position_embeddings", None)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, input_ids: Tensor, positions: Tensor, past_keys: Tensor | None = None,
                past_values: Tensor | None = None) -> tuple[Tensor, ...]:
        def past(index: int) -> tuple[Tensor, Tensor]:
            return past_keys[index], past_values[index]

        return self.run(input_ids, positions, None if self.prefill else past)

    def run(self, input_ids: Tensor, positions: Tensor, past: Callable[[int], tuple[Tensor, Tensor]] | None,
            parts: Callable[[int], list[tuple[Tensor, Tensor, Tensor | None]]] | None = None) -> tuple[Tensor, ...]:
        """The forward with layer `i`'s past keys and values from `past(i)` (None: no past), or from
        `parts(i)`: pieces (keys, values, valid or None) attended to apart and combined exactly
        (one softmax over all of them, computed from each piece's exponentials), so no tensor spans
        two pieces of different symbolic lengths; `valid` (bool, piece length) masks padding."""
        batch, length = input_ids.shape
        h = self.embed(input_ids)
        cos, sin = self.rotary(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        group = self.heads // self.kv_heads
        new_keys: list[Tensor] = []
        new_values: list[Tensor] = []
        observed: list[Tensor] = []
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            # the query heads sharing a KV head become rows of one matmul: (b, kv, group*T, d)
            qg = q.reshape(batch, self.kv_heads, group * length, self.head_dim)
            row = torch.arange(length, device=h.device).repeat(group).unsqueeze(-1)
            if parts is not None:
                out = self._attend_parts(qg, parts(index), k, v, row)
            else:
                if past is None:
                    keys, values = k, v
                else:
                    past_k, past_v = past(index)
                    keys = torch.cat([past_k, k], dim=2)
                    values = torch.cat([past_v, v], dim=2)
                total = keys.shape[2]
                scores = qg @ keys.transpose(2, 3) * (1.0 / math.sqrt(self.head_dim))
                allowed = torch.arange(total, device=h.device).unsqueeze(0) <= row + (total - length)
                scores = scores.masked_fill(~allowed, float("-inf"))
                out = torch.softmax(scores, dim=-1) @ values                  # (b, kv, group*T, d)
            out = out.reshape(batch, self.heads, length, self.head_dim).transpose(1, 2)
            h = h + attn.o_proj(out.reshape(batch, length, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            new_keys.append(k)
            new_values.append(v)
            if self.observe:
                observed.append(q[:, :, -self.observe:, :])
        logits = self.lm_head(self.norm(h))
        outputs = (logits, torch.stack(new_keys), torch.stack(new_values))
        return (*outputs, torch.stack(observed)) if self.observe else outputs

    def _attend_parts(self, qg: Tensor, parts: list[tuple[Tensor, Tensor, Tensor | None]], k: Tensor, v: Tensor,
                      row: Tensor) -> Tensor:
        scale = 1.0 / math.sqrt(self.head_dim)
        causal = torch.arange(k.shape[2], device=k.device).unsqueeze(0) <= row
        pieces = [*parts, (k, v, causal)]
        scores = []
        for keys, _values, valid in pieces:
            piece = qg @ keys.transpose(2, 3) * scale
            scores.append(piece if valid is None else piece.masked_fill(~valid, float("-inf")))
        peak = scores[-1].max(-1, keepdim=True).values  # finite: each query sees itself
        for piece in scores[:-1]:  # (a piece may be empty: the running peak joins its reduction)
            peak = torch.cat([piece, peak], dim=-1).max(-1, keepdim=True).values
        total, weight = None, None
        for piece, (_keys, values, _valid) in zip(scores, pieces):
            e = torch.exp(piece - peak)
            part_out, part_weight = e @ values, e.sum(-1, keepdim=True)
            total = part_out if total is None else total + part_out
            weight = part_weight if weight is None else weight + part_weight
        return total / weight


class CompressedDecodeStep(nn.Module):
    """A decode step whose past is a quantized cache body (kv_dequantize's layout, see
    :mod:`fxpress.ops.kv`) plus a float16 tail of recent tokens: the graph restores the cache itself.

        logits, keys, values = step(input_ids, positions, k_codes, k_scale, k_low, v_codes, v_scale,
                                    v_low, slots, tail_keys, tail_values, tail_length)

    The body grows in whole groups; `slots` ((S,) uint8: 1 where the body holds a token, 0 in the
    stand-in body of an empty cache) carries its length as a symbol of its own (see
    :mod:`fxpress.ops.kv`).  The tail is padded to a fixed capacity (layers, 1, heads, capacity,
    head_dim); its first `tail_length` (a (1,) int64 tensor) slots hold tokens, the rest are masked
    out.  Body, tail and the new token are attended to as separate pieces (:meth:`DecoderStep.run`):
    a tensor spanning body and tail would have a length like S + 73, which TVM's reshape analysis
    cannot split.  `rotation` (head_dim, head_dim) undoes a rotation the cache applied before
    quantizing.
    """

    def __init__(self, step: DecoderStep, key_bits: int, key_group: int, keys_per_channel: bool,
                 value_bits: int, value_group: int, rotation: Tensor | None = None):
        super().__init__()
        self.step = step
        self.keys = (key_bits, key_group, keys_per_channel)
        self.values = (value_bits, value_group)
        self.rotate = rotation is not None
        self.register_buffer("rotation", rotation.t().contiguous() if rotation is not None else torch.zeros(0),
                             persistent=False)

    def forward(self, input_ids: Tensor, positions: Tensor, k_codes: Tensor, k_scale: Tensor, k_low: Tensor,
                v_codes: Tensor, v_scale: Tensor, v_low: Tensor, slots: Tensor, tail_keys: Tensor,
                tail_values: Tensor, tail_length: Tensor) -> tuple[Tensor, ...]:
        from fxpress.ops.kv import KV_DEQUANTIZE

        step = self.step
        shape = (step.num_layers, step.kv_heads, step.head_dim)
        keys = KV_DEQUANTIZE(k_codes, k_scale, k_low, slots, self.keys[0], self.keys[1], *shape, self.keys[2])
        values = KV_DEQUANTIZE(v_codes, v_scale, v_low, slots, self.values[0], self.values[1], *shape, False)
        if self.rotate:
            keys, values = keys @ self.rotation, values @ self.rotation
        tail_keys, tail_values = tail_keys.float(), tail_values.float()

        valid = torch.arange(tail_keys.shape[3], device=keys.device) < tail_length
        body = slots > 0

        def parts(index: int) -> list[tuple[Tensor, Tensor, Tensor | None]]:
            return [(keys[index], values[index], body), (tail_keys[index], tail_values[index], valid)]

        return step.run(input_ids, positions, None, parts)
