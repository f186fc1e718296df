"""Cache policy strings: what a compressed KV cache stores, parsed and checked once.

    full                                  every token, float16 (the reference the byte ratios divide)
    quant{bits=4, group=32, window=32}    KIVI-style: values per token in groups of `group` channels
                                          (default 32, or the head dim when smaller),
                                          keys per channel in groups of `kgroup` tokens (default
                                          `group`); `kbits`/`vbits` set keys and values apart; the
                                          `window` most recent tokens stay float16; `rotate=true`
                                          rotates head vectors (Hadamard) first; `keys=token`
                                          groups keys per token like values
    minicache{start, t=0.6, gamma=0.05}   merge layer pairs (start, start+1), (start+2, start+3), ...
                                          (default start = layers // 2); `values_only=true` merges V only
    merge-values{...}                     minicache{values_only=true, ...}
    snapkv{keep=0.5, window=32, kernel=7} keep the `keep` fraction of the prompt's tokens (per layer and
                                          KV head) that its last `window` queries attend to most
                                          (`score=max`: the most any of them attends, not the sum)
    streaming{sinks=4, window=256}        StreamingLLM: the first `sinks` tokens and the last `window`

Components compose with ``+``, at most one of each kind (eviction, merging, quantization):
``snapkv{keep=0.6}+quant{bits=4}``.  Eviction picks tokens, merging pairs layers over the picked
tokens, quantization stores what is left (merged directions included).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from fxpress.generation.decoder import GenerationError
from fxpress.ops.kv import KV_BITS

_ITEM = re.compile(r"^\s*([a-z][a-z0-9_-]*)\s*(?:\{(.*)\})?\s*$", re.S)


@dataclass(frozen=True)
class QuantSpec:
    key_bits: int = 4
    value_bits: int = 4
    group: int | None = None      # values: channels per group (divides the head dim); None: min(32, head dim)
    window: int = 32
    key_group: int | None = None  # keys: tokens per group (per channel); None: the value group
    rotate: bool = False          # rotate head vectors (Hadamard) before quantizing
    key_axis: str = "channel"     # keys per channel (groups along tokens) or per token


@dataclass(frozen=True)
class MergeSpec:
    start: int | None = None  # None: layers // 2
    t: float = 0.6
    gamma: float = 0.05
    values_only: bool = False


@dataclass(frozen=True)
class EvictSpec:
    method: str = "snapkv"  # snapkv | streaming
    keep: float = 0.5
    window: int = 32
    kernel: int = 7
    sinks: int = 4
    score: str = "sum"  # how the window's attention adds up: sum (SnapKV) or max


@dataclass(frozen=True)
class CachePolicy:
    """A parsed policy; `bind(layers, head_dim)` checks it against a model and fixes defaults."""

    text: str = "full"
    quant: QuantSpec | None = None
    merge: MergeSpec | None = None
    evict: EvictSpec | None = None
    layers: int | None = None
    components: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_full(self) -> bool:
        return self.quant is None and self.merge is None and self.evict is None

    @property
    def observe(self) -> int:
        """Prompt queries the policy scores tokens with (SnapKV's observation window), else 0."""
        return self.evict.window if self.evict and self.evict.method == "snapkv" else 0

    @property
    def recent(self) -> int:
        """Most recent tokens kept float16 whatever else the policy does."""
        windows = [0]
        if self.quant:
            windows.append(self.quant.window)
        if self.evict and self.evict.method == "snapkv":
            windows.append(self.evict.window)
        return max(windows)

    def merged_pairs(self) -> list[tuple[int, int]]:
        if not self.merge or self.layers is None:
            return []
        return [(i, i + 1) for i in range(self.merge.start, self.layers - 1, 2)]

    def bind(self, layers: int, head_dim: int) -> CachePolicy:
        where = f"cache policy '{self.text}'"
        merge = self.merge
        if merge is not None:
            start = layers // 2 if merge.start is None else merge.start
            if not 0 <= start < layers - 1:
                raise GenerationError(f"{where}: minicache start={start} leaves no pair of adjacent layers to "
                                      f"merge in a {layers}-layer model; use start in [0, {layers - 2}]")
            merge = replace(merge, start=start)
        quant = self.quant
        if quant is not None:
            group = quant.group or min(32, head_dim)
            if head_dim % group:
                raise GenerationError(f"{where}: quant group {group} must divide the head dim "
                                      f"{head_dim} (values are quantized per token in groups of channels)")
            quant = replace(quant, group=group, key_group=quant.key_group or group)
        return replace(self, merge=merge, quant=quant, layers=layers)


def _value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _options(body: str | None, where: str) -> dict:
    options = {}
    for part in (body or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise GenerationError(f"{where}: option '{part.strip()}' needs a value (name=value)")
        key, value = part.split("=", 1)
        options[key.strip()] = _value(value)
    return options


def _take(options: dict, allowed: dict, where: str) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise GenerationError(f"{where}: unknown option(s) {', '.join(unknown)}; options: {', '.join(allowed)}")
    out = dict(allowed)
    out.update(options)
    return out


def _bits(value, what: str, where: str) -> int:
    if value not in KV_BITS:
        raise GenerationError(f"{where}: {what}={value} is not supported; cache bits are one of "
                              f"{', '.join(map(str, KV_BITS))}")
    return int(value)


def _positive_int(value, what: str, where: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GenerationError(f"{where}: {what} must be an integer >= {minimum}, got {value!r}")
    return value


def _quant(options: dict, where: str) -> QuantSpec:
    o = _take(options, {"bits": 4, "kbits": None, "vbits": None, "group": None, "kgroup": None, "window": 32,
                        "rotate": False, "keys": "channel"}, where)
    if o["keys"] not in ("channel", "token"):
        raise GenerationError(f"{where}: keys={o['keys']} must be channel or token (how keys are grouped)")
    bits = _bits(o["bits"], "bits", where)
    key_bits = _bits(o["kbits"], "kbits", where) if o["kbits"] is not None else bits
    value_bits = _bits(o["vbits"], "vbits", where) if o["vbits"] is not None else bits
    group = _positive_int(o["group"], "group", where) if o["group"] is not None else None
    key_group = _positive_int(o["kgroup"], "kgroup", where) if o["kgroup"] is not None else None
    return QuantSpec(key_bits, value_bits, group, _positive_int(o["window"], "window", where, 0), key_group,
                     bool(o["rotate"]), o["keys"])


def _merge(options: dict, where: str, values_only: bool) -> MergeSpec:
    o = _take(options, {"start": None, "t": 0.6, "gamma": 0.05, "values_only": values_only}, where)
    start = None if o["start"] is None else _positive_int(o["start"], "start", where, 0)
    t, gamma = float(o["t"]), float(o["gamma"])
    if not 0.0 <= t <= 1.0:
        raise GenerationError(f"{where}: t={t} must lie in [0, 1] (the SLERP position between the two layers)")
    if not 0.0 <= gamma <= 1.0:
        raise GenerationError(f"{where}: gamma={gamma} must lie in [0, 1] (0 retains no token unmerged)")
    return MergeSpec(start, t, gamma, bool(o["values_only"]))


def _evict(name: str, options: dict, where: str) -> EvictSpec:
    if name == "snapkv":
        o = _take(options, {"keep": 0.5, "window": 32, "kernel": 7, "score": "sum"}, where)
        keep = float(o["keep"])
        if not 0.0 < keep <= 1.0:
            raise GenerationError(f"{where}: keep={keep} must lie in (0, 1] (the fraction of prompt tokens kept)")
        kernel = _positive_int(o["kernel"], "kernel", where)
        if kernel % 2 == 0:
            raise GenerationError(f"{where}: kernel={kernel} must be odd (a centred pooling window)")
        if o["score"] not in ("sum", "max"):
            raise GenerationError(f"{where}: score={o['score']} must be sum or max")
        return EvictSpec("snapkv", keep, _positive_int(o["window"], "window", where), kernel, score=o["score"])
    o = _take(options, {"sinks": 4, "window": 256}, where)
    return EvictSpec("streaming", 1.0, _positive_int(o["window"], "window", where),
                     sinks=_positive_int(o["sinks"], "sinks", where, 0))


KINDS = {"quant": "quantization", "kivi": "quantization", "minicache": "merging", "merge-values": "merging",
         "snapkv": "eviction", "streaming": "eviction"}


def split_components(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "{"
        depth -= char == "}"
        if char == "+" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def parse_policy(text: str | CachePolicy | None) -> CachePolicy:
    """Parse a policy string (module doc); GenerationError naming the component for bad input."""
    if isinstance(text, CachePolicy):
        return text
    text = (text or "full").strip()
    if text == "full":
        return CachePolicy("full")
    found: dict[str, object] = {}
    names = []
    for part in split_components(text):
        match = _ITEM.match(part)
        if not match:
            raise GenerationError(f"cache policy '{text}': cannot read '{part.strip()}'; "
                                  "write name{option=value,...}")
        name, body = match.group(1), match.group(2)
        where = f"cache policy '{text}', component {name}"
        if name == "full":
            raise GenerationError(f"cache policy '{text}': 'full' stands alone; drop it to compose the others")
        if name not in KINDS:
            raise GenerationError(f"cache policy '{text}': unknown component '{name}'; components: "
                                  f"full, {', '.join(KINDS)}")
        kind = KINDS[name]
        if kind in found:
            raise GenerationError(f"cache policy '{text}': two {kind} components; use at most one of each kind")
        options = _options(body, where)
        if kind == "quantization":
            found[kind] = _quant(options, where)
        elif kind == "merging":
            found[kind] = _merge(options, where, values_only=name == "merge-values")
        else:
            found[kind] = _evict(name, options, where)
        names.append(name)
    return CachePolicy(text, found.get("quantization"), found.get("merging"), found.get("eviction"),
                       components=tuple(names))
