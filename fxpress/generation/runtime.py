"""Generation through a compressed KV cache: prefill, score, decode; eager, captured or compiled.

    gen = Generator(zoo_model_or_hf_lm, tokenizer, target="eager")    # or "export", "llvm"
    result = gen.generate("Once upon a time", max_new_tokens=32, policy="snapkv{keep=0.5}+quant{bits=4}")
    result.text, result.tokens_per_s, result.stored_bytes, result.full_bytes

Two graphs run a model: the prefill graph (the prompt, no past) and the decode-step graph (one
token, the past as explicit tensors; see :mod:`fxpress.generation.decoder`).  ``target="eager"`` runs
the modules; ``"export"`` runs them captured by :func:`fxpress.capture` (torch.export); a TVM target
(``"llvm"``) compiles both with :func:`fxpress.backends.compile`, the decode step with a dynamic past
length.  Each step restores the cache (dequantize, un-merge) from its stored form, so the time of
restoring is in tokens/s.  On captured and compiled targets, a policy with a quantized body (and no
layer merging) runs through a decode graph that takes the stored form itself - codes, scales,
minimums and the float16 tail - and restores it with ``fxpress::kv_dequantize`` inside the graph
(:class:`~fxpress.generation.decoder.CompressedDecodeStep`).  Generation runs one sequence at a time.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fxpress.generation.cache import CompressedCache
from fxpress.generation.decoder import CompressedDecodeStep, DecoderStep, GenerationError, check_decoder
from fxpress.generation.policy import CachePolicy, parse_policy

log = logging.getLogger(__name__)

TARGETS = ("eager", "export", "llvm")
OBSERVE = 32  # queries a captured or compiled prefill graph returns (SnapKV's default window)


@dataclass
class Prefilled:
    """A prompt run through the prefill graph: its last logits, keys, values (layers, kv, T, d) and
    the last queries (layers, heads, w, d) when observed."""

    ids: Tensor
    logits: Tensor
    keys: Tensor
    values: Tensor
    queries: Tensor | None = None


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str | None
    policy: str
    target: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    stored_bytes: int
    full_bytes: int
    cache_stats: dict = field(default_factory=dict)
    cache_in_graph: bool = False  # the decode graph took the stored form and restored it itself

    @property
    def tokens_per_s(self) -> float:
        """Decode steps per second (the first token comes from prefill)."""
        steps = len(self.tokens) - 1
        return steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def kv_bytes_ratio(self) -> float:
        return self.full_bytes / max(self.stored_bytes, 1)


@dataclass
class ScoreResult:
    """Negative log-likelihoods of a continuation scored through a compressed context cache."""

    nll: Tensor               # (continuation tokens,)
    predictions: Tensor       # argmax token at each continuation position
    stored_bytes: int
    full_bytes: int
    cache_stats: dict

    @property
    def kv_bytes_ratio(self) -> float:
        return self.full_bytes / max(self.stored_bytes, 1)


class Generator:
    """Prefill and decode steps of a decoder LM for one target (see the module doc)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, target: str = "eager", **compile_options: Any):
        model = getattr(model, "module", model)  # a ZooModel
        self.lm = check_decoder(model)
        if target not in TARGETS:
            raise GenerationError(f"generation target '{target}' is not one of {', '.join(TARGETS)}")
        self.tokenizer = tokenizer
        self.target = target
        self.step_module = DecoderStep(self.lm).eval()
        self.layers = self.step_module.num_layers
        self.kv_heads, self.head_dim = self.step_module.kv_heads, self.step_module.head_dim
        self.max_positions = self.step_module.max_positions
        self.compile_options = compile_options
        self._prefill: dict[int, Callable] = {}
        self._decode: Callable | None = None
        self._compressed: dict[tuple, Callable] = {}
        self.heads = self.step_module.heads

    # -- the two graphs ----------------------------------------------------------------------------
    def _build(self, module: nn.Module, inputs: tuple, dynamic: dict, what: str) -> Callable:
        if self.target == "eager":
            return module
        from fxpress.ir import capture
        graph = capture(module, inputs, dynamic=dynamic, name=f"{type(self.lm).__name__}.{what}")
        if self.target == "export":
            return graph.module
        from fxpress.backends import compile as compile_graph
        return compile_graph(graph, self.target, dynamic=True, **self.compile_options)

    def prefill_fn(self, observe: int) -> Callable:
        """The prefill graph returning at least the last `observe` queries (one built per size, and a
        graph that observes more serves a request for fewer)."""
        larger = [size for size in self._prefill if size >= observe]
        if larger and self.target != "eager":
            return self._prefill[min(larger)]
        if self.target != "eager":  # one graph for every policy: observe SnapKV's default window at least
            observe = max(observe, OBSERVE)
        if observe not in self._prefill:
            module = DecoderStep(self.lm, prefill=True, observe=observe).eval()
            example = torch.zeros(1, max(observe, 2) + 2, dtype=torch.long)
            self._prefill[observe] = self._build(module, (example, torch.arange(example.shape[1]).unsqueeze(0)),
                                                 {0: {1: "tokens"}, 1: {1: "tokens"}}, "prefill")
        return self._prefill[observe]

    def decode_fn(self) -> Callable:
        if self._decode is None:
            past = torch.zeros(self.layers, 1, self.kv_heads, 4, self.head_dim)
            example = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([[4]]), past, past.clone())
            self._decode = self._build(self.step_module, example, {2: {3: "past"}, 3: {3: "past"}}, "decode")
        return self._decode

    def compressed_decode_fn(self, cache: CompressedCache) -> Callable:
        """The decode-step graph that takes `cache`'s packed body and tail and restores them itself
        (one graph per quantization setting)."""
        options = cache.compressed_step_options()
        key = (*((k, v if not isinstance(v, Tensor) else "rotated") for k, v in options.items()),
               cache.tail_capacity)
        if key not in self._compressed:
            module = CompressedDecodeStep(self.step_module, **options).eval()
            # an example cache of the same stored form: 2 groups of tokens in the body, 3 in the tail
            policy = replace(cache.policy, evict=None, quant=replace(cache.policy.quant, window=3))
            example = CompressedCache(policy, self.layers, self.kv_heads, self.head_dim, cache.tail_capacity)
            tokens = 2 * example.key_unit + 3
            example.load(torch.randn(self.layers, self.kv_heads, tokens, self.head_dim),
                         torch.randn(self.layers, self.kv_heads, tokens, self.head_dim))
            inputs = (torch.zeros(1, 1, dtype=torch.long), torch.tensor([[tokens]]), *example.packed())
            dims = {i: {1: "groups"} for i in range(2, 8)}
            dims[8] = {0: "tokens"}
            self._compressed[key] = self._build(module, inputs, dims, "decode_compressed")
        return self._compressed[key]

    def uses_compressed_graph(self, cache: CompressedCache) -> bool:
        """Whether decoding hands the graph the cache's stored form (captured and compiled targets,
        policies with a quantized body); otherwise the cache is restored first."""
        return self.target != "eager" and cache.packable is None

    # -- running -----------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | Tensor) -> Tensor:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError("a text prompt needs the model's tokenizer; pass token ids or a tokenizer")
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long)
        ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
        if ids.shape[0] != 1 or ids.shape[1] == 0:
            raise GenerationError(f"generation runs one non-empty sequence at a time; got token ids of shape "
                                  f"{tuple(ids.shape)}")
        return ids

    def _check_length(self, tokens: int) -> None:
        if self.max_positions and tokens > self.max_positions:
            raise GenerationError(f"{tokens} tokens (prompt + generated) exceed the model's "
                                  f"{self.max_positions} positions (max_position_embeddings); shorten the "
                                  "prompt or generate fewer tokens")

    def _runs_prefill_graph(self, tokens: int, observe: int) -> bool:
        """Whether a prompt of `tokens` runs the prefill graph (eager targets: always the module)."""
        return self.target == "eager" or tokens >= max(observe, OBSERVE) + 2

    @torch.no_grad()
    def prefill(self, prompt: str | list[int] | Tensor, observe: int = 0) -> Prefilled:
        ids = self.encode(prompt)
        self._check_length(ids.shape[1])
        observe = min(observe, ids.shape[1])
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        if not self._runs_prefill_graph(ids.shape[1], observe):
            # shorter than the prefill graph was captured for (it returns OBSERVE queries): run it eagerly
            out = DecoderStep(self.lm, prefill=True, observe=observe).eval()(ids, positions)
        else:
            out = self.prefill_fn(observe)(ids, positions)
        queries = out[3][:, 0, :, -observe:] if observe else None
        return Prefilled(ids, out[0][0, -1], out[1][:, 0], out[2][:, 0], queries)

    def policy(self, policy: str | CachePolicy | None) -> CachePolicy:
        return parse_policy(policy).bind(self.layers, self.head_dim)

    def new_cache(self, policy: str | CachePolicy | None, prefilled: Prefilled) -> CompressedCache:
        bound = self.policy(policy)
        cache = CompressedCache(bound, self.layers, self.kv_heads, self.head_dim)
        cache.load(prefilled.keys, prefilled.values, prefilled.queries)
        return cache

    @torch.no_grad()
    def score(self, prefilled: Prefilled, continuation: Tensor, policy: str | CachePolicy | None = None) -> ScoreResult:
        """Score `continuation` (token ids) after the prefilled context, the context's cache compressed
        by `policy`, at the continuation's true positions (one eager chunk through the decode module)."""
        bound = self.policy(policy)
        needed = min(bound.observe, prefilled.ids.shape[1])
        if needed and (prefilled.queries is None or prefilled.queries.shape[2] < needed):
            raise GenerationError(f"cache policy '{bound.text}' needs the context prefilled with "
                                  f"observe={bound.observe}")
        continuation = torch.as_tensor(continuation, dtype=torch.long).reshape(1, -1)
        start = prefilled.ids.shape[1]
        self._check_length(start + continuation.shape[1])
        queries = prefilled.queries[:, :, -needed:] if needed else None
        cache = CompressedCache(bound, self.layers, self.kv_heads, self.head_dim)
        cache.load(prefilled.keys, prefilled.values, queries)
        past_k, past_v = cache.restore()
        inputs = continuation[:, :-1]
        positions = torch.arange(start, start + inputs.shape[1]).unsqueeze(0)
        logits = self.step_module(inputs, positions, past_k, past_v)[0][0]
        logits = torch.cat([prefilled.logits.unsqueeze(0), logits])
        nll = torch.nn.functional.cross_entropy(logits.float(), continuation[0], reduction="none")
        return ScoreResult(nll, logits.argmax(-1), cache.stored_bytes, cache.full_bytes, cache.stats.as_dict())

    @torch.no_grad()
    def generate(self, prompt: str | list[int] | Tensor, max_new_tokens: int = 32,
                 policy: str | CachePolicy | None = None, *, stop_at_eos: bool = True,
                 progress: Callable[[int], None] | None = None) -> GenerationResult:
        """Greedy decoding through the compressed cache; times prefill and decode apart."""
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        bound = self.policy(policy)
        ids = self.encode(prompt)
        self._check_length(ids.shape[1] + max_new_tokens)
        cache = CompressedCache(bound, self.layers, self.kv_heads, self.head_dim)
        in_graph = self.uses_compressed_graph(cache)
        decode = self.compressed_decode_fn(cache) if in_graph else self.decode_fn()
        if self._runs_prefill_graph(ids.shape[1], bound.observe):
            self.prefill_fn(bound.observe)  # built (captured, compiled) before the clock starts
        start = time.perf_counter()
        prefilled = self.prefill(ids, observe=bound.observe)
        cache.load(prefilled.keys, prefilled.values, prefilled.queries)
        token = int(prefilled.logits.argmax())
        prefill_s = time.perf_counter() - start
        eos = getattr(self.tokenizer, "eos_token_id", None) if stop_at_eos else None
        tokens = [token]
        start = time.perf_counter()
        position = ids.shape[1]
        while len(tokens) < max_new_tokens and token != eos:
            past = cache.packed() if in_graph else cache.restore()
            out = decode(torch.tensor([[token]]), torch.tensor([[position]]), *past)
            cache.append(out[1][:, 0], out[2][:, 0])
            token = int(out[0][0, -1].argmax())
            tokens.append(token)
            position += 1
            if progress:
                progress(len(tokens))
        decode_s = time.perf_counter() - start
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationResult(tokens, text, bound.text, self.target, ids.shape[1], prefill_s, decode_s,
                                cache.stored_bytes, cache.full_bytes, cache.stats.as_dict(), in_graph)
