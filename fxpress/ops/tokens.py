"""Token-reduction IR ops: `fxpress::merge_tokens` and `fxpress::tail_drop`.

Both are `torch.library` custom ops, so they sit in an FX graph as single
nodes (`torch.ops.fxpress.merge_tokens.default`), run eagerly through the
reference PyTorch implementations below, and carry fake kernels so a
rewritten graph can be traced or re-exported with symbolic shapes.

    merge_tokens(x, metric, size, r, mode, protect_cls, spread, temperature) -> (x', size')
        x (B, N, C) tokens, size (B, N, 1) tokens merged into each so far
        (None: all ones).  Removes r tokens (clamped to (N - protect_cls) // 2)
        and returns X' = (T diag(size) X) / (T size), size' = T size, where T
        (N' x N) depends on `mode`:
          bipartite  ToMe: metric (B, N, c) or (B, H, N, c) are keys (averaged
                     over heads); alternate split A/B, each A token's best B
                     match by cosine; the r best-matched A tokens are merged
                     into their match (many-to-one).
          transform  Token Transforming: same removed set, but each removed token
                     is spread over its `spread` most similar kept tokens with
                     weights softmax(cos / temperature) (many-to-many).
          prune      metric (B, N) is importance (attention received from CLS);
                     T is one-hot on the N - r most important tokens, in order.
        Output order: unmerged A tokens (sorted when protect_cls), then B tokens
        (bipartite, transform); kept tokens in order (prune).  With protect_cls
        token 0 is never removed or merged into and stays at position 0.

    tail_drop(x, keep) -> x[:, :keep]   (One-D-Piece: keep the head of a 1D token sequence)

MACs (`merge_tokens_macs`, which sees `mode` and `r` on the node): the
similarity matmuls and the weighted sums that move removed tokens; `prune`
only selects (its importance metric is computed by the ATen nodes before it,
which count themselves).  Backends lower these ops through their own rule
tables (`fxpress/backends/tvm/token_rules.py`); a backend without a rule
raises a LoweringError naming the op and node.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fxpress.ir.opinfo import OpInfo, define_op
from fxpress.ops import native_merge

MODES = ("bipartite", "transform", "prune")


# -- reference implementations ----------------------------------------------------------------
def max_merge(tokens: Any, protect_cls: bool) -> Any:
    """Largest r the bipartite split allows: half the unprotected tokens."""
    return (tokens - int(protect_cls)) // 2


def _unit_keys(metric: Tensor) -> Tensor:
    """Keys (B, H, N, c) summed over heads, or a metric (B, N, c), scaled to unit length per token.

    The head sum is the head mean up to a scale cosine similarity ignores, written as a loop of slice
    adds (faster than `sum(1)` on the strided keys a qkv reshape gives) and normalised in place.
    """
    if metric.dim() != 4:
        return metric / metric.norm(dim=-1, keepdim=True)
    heads = metric.unbind(1)
    total = heads[0] + heads[1] if len(heads) > 1 else heads[0].clone()
    for head in heads[2:]:
        total += head
    return total.div_(total.norm(dim=-1, keepdim=True))


def _scores(unit: Tensor) -> Tensor:
    """Cosine similarities B-major: (B, B tokens, A tokens) = unit B tokens @ unit A tokens^T."""
    return unit[:, 1::2] @ unit[:, ::2].mT


def _best_match(unit: Tensor) -> tuple[Tensor, Tensor]:
    """Each A token's best B match by cosine: (similarity, B index), each (B, A tokens).

    The scores are computed B-major, (B, B tokens, A tokens), so that their transpose is a
    channels-last pooling input: a max-pool over the B tokens runs several times faster than
    `max(dim=-1)` on these short rows, with the same values and the same first-maximum index.
    """
    scores = _scores(unit)
    best, index = F.max_pool2d(scores.mT.unsqueeze(2), (1, scores.shape[1]), return_indices=True)
    return best.flatten(1), index.flatten(1)


def _bipartite_plan(unit: Tensor, r: int, protect_cls: bool) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe matching: (unmerged A positions, merged A positions, their B targets), each (B, k)."""
    node_max, node_idx = _best_match(unit)
    if protect_cls:
        node_max.select(1, 0).fill_(-math.inf)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)  # ties: lower index first
    unmerged, merged = edge_idx[:, r:], edge_idx[:, :r]
    if protect_cls:
        unmerged = unmerged.sort(dim=1).values
    return unmerged, merged, node_idx.gather(dim=1, index=merged)


def _combine(x: Tensor, size: Tensor | None, kept: Tensor, removed: Tensor, slots: Tensor,
             weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """X' = T (size * X) / T size, T: one-hot on `kept` tokens plus `weight` from `removed` to `slots`.

    Written as x'_j = x_j * s_j / t_j + sum_i x_i * w_i s_i / t_j with the totals t = T size
    computed first on the small size vectors, so the token rows are touched by few flat ops
    (no x * size, no division pass); a token nothing merges into is copied exactly.
    """
    batch, tokens, channels = x.shape
    kept_count = kept.shape[1]
    rows = torch.arange(batch, device=x.device)[:, None]
    flat_kept, flat_removed = (kept + rows * tokens).view(-1), (removed + rows * tokens).view(-1)
    flat_slots = (slots + rows * kept_count).view(-1)
    if size is None:
        own, mass = x.new_ones(flat_kept.shape[0]), None if weight is None else weight.reshape(-1)
    else:
        sizes = size.reshape(-1)
        own, mass = sizes.index_select(0, flat_kept), sizes.index_select(0, flat_removed)
        mass = mass if weight is None else mass * weight.reshape(-1)
    mass = own.new_ones(flat_slots.shape[0]) if mass is None else mass
    total = own.index_add(0, flat_slots, mass)
    moved_share = mass / total.index_select(0, flat_slots)
    values = x.reshape(-1, channels)
    merged = values.index_select(0, flat_kept).mul_((own / total)[:, None])
    merged.index_add_(0, flat_slots, values.index_select(0, flat_removed).mul_(moved_share[:, None]))
    return merged.view(batch, kept_count, channels), total.view(batch, kept_count, 1)


def _kept_tokens(unmerged: Tensor, tokens: int) -> Tensor:
    """Token indices in output order: unmerged A tokens, then every B token."""
    b_tokens = torch.arange(1, tokens, 2, device=unmerged.device).expand(unmerged.shape[0], -1)
    return torch.cat([unmerged * 2, b_tokens], dim=1)


def _bipartite(x: Tensor, size: Tensor | None, unit: Tensor, r: int, protect_cls: bool) -> tuple[Tensor, Tensor]:
    """`_combine` specialised to many-to-one merges into B tokens, with fewer and smaller ops.

    Rows are flat indices b * N + token into x; sizes are gathered with the same indices (`take`),
    totals are scatter-added per B token, and only the B rows are rescaled.  The arithmetic is
    `_combine`'s term for term (x_j * (s_j / t_j) + x_i * (s_i / t_j), added in the same order).
    """
    batch, tokens, channels = x.shape
    unmerged, merged, targets = _bipartite_plan(unit, r, protect_cls)
    kept_a, out_tokens = unmerged.shape[1], tokens - r
    offsets = torch.arange(0, batch * tokens, tokens, device=x.device).unsqueeze(1)
    a_rows, moved_rows = torch.add(offsets, unmerged, alpha=2), torch.add(offsets, merged, alpha=2)
    b_rows = torch.arange(1, tokens, 2, device=x.device) + offsets
    sizes = x.new_ones(batch, tokens) if size is None else size.view(batch, tokens)
    moved_size, b_size = sizes.take(moved_rows), sizes[:, 1::2]
    total = b_size.scatter_add(1, targets, moved_size)
    values = x.reshape(-1, channels)
    out = values.index_select(0, torch.cat([a_rows, b_rows], dim=1).view(-1)).view(batch, out_tokens, channels)
    out[:, kept_a:].mul_((b_size / total).unsqueeze(-1))
    moved = values.index_select(0, moved_rows.view(-1)).mul_(moved_size.div_(total.gather(1, targets)).view(-1, 1))
    slots = torch.arange(kept_a, batch * out_tokens, out_tokens, device=x.device).unsqueeze(1) + targets
    out.view(-1, channels).index_add_(0, slots.view(-1), moved)
    return out, torch.cat([sizes.take(a_rows), total], dim=1).unsqueeze(-1)


# The fused CPU path: similarities from torch (one bmm), everything else in one C call over the batch
# (`fxpress/ops/token_merge.c`), bit-identical to `_bipartite`.  Used for float32 CPU inputs outside
# autograd; `FUSED = False` (or no C compiler) keeps the torch path.
FUSED = True


def _fused_qualifies(x: Tensor, size: Tensor | None, unit: Tensor) -> bool:
    tensors = (x, unit) if size is None else (x, unit, size)
    return (FUSED and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and (size is None or size.numel() == x.shape[0] * x.shape[1]) and native_merge.available())


def _fused_bipartite(x: Tensor, size: Tensor | None, unit: Tensor, r: int, protect_cls: bool) -> tuple[Tensor, Tensor]:
    return native_merge.bipartite_merge(x, size, _scores(unit), r, protect_cls)


def _transform(x: Tensor, size: Tensor | None, unit: Tensor, r: int, protect_cls: bool,
               spread: int, temperature: float) -> tuple[Tensor, Tensor]:
    unmerged, merged, _ = _bipartite_plan(unit, r, protect_cls)
    kept, removed = _kept_tokens(unmerged, x.shape[1]), merged * 2
    pick = lambda index: unit.gather(1, index[..., None].expand(-1, -1, unit.shape[-1]))  # noqa: E731
    similarity = pick(removed) @ pick(kept).transpose(-1, -2)  # (B, r, N')
    if protect_cls:
        similarity[:, :, 0] = -math.inf
    best, slots = _stable_topk(similarity, min(spread, kept.shape[1] - int(protect_cls)))
    weight = torch.softmax(best / temperature, dim=-1)
    return _combine(x, size, kept, removed[..., None].expand_as(slots).flatten(1), slots.flatten(1),
                    weight.flatten(1))


def _stable_topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest along the last dim, ties to the lower index (``topk`` picks among exact ties
    freely, so its choice was neither reproducible nor what the TVM rule computes)."""
    indices = values.argsort(dim=-1, descending=True, stable=True)[..., :k]
    return values.gather(-1, indices), indices


def _prune(x: Tensor, size: Tensor | None, importance: Tensor, r: int, protect_cls: bool) -> tuple[Tensor, Tensor]:
    if protect_cls:
        importance = torch.cat([torch.full_like(importance[:, :1], math.inf), importance[:, 1:]], dim=1)
    keep = _stable_topk(importance, x.shape[1] - r)[1].sort(dim=1).values
    keep = (keep + torch.arange(x.shape[0], device=x.device)[:, None] * x.shape[1]).view(-1)
    size = torch.ones_like(x[..., :1]) if size is None else size
    pick = lambda values: values.reshape(-1, values.shape[-1]).index_select(0, keep)  # noqa: E731
    return pick(x).view(x.shape[0], -1, x.shape[-1]), pick(size).view(x.shape[0], -1, 1)


def reduce_tokens(x: Tensor, metric: Tensor, size: Tensor | None, r: int, mode: str,
                  protect_cls: bool = True, spread: int = 3, temperature: float = 0.1) -> tuple[Tensor, Tensor]:
    """Reference implementation of `fxpress::merge_tokens` (see module doc)."""
    if mode not in MODES:
        raise ValueError(f"merge_tokens: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    r = max(0, min(int(r), max_merge(x.shape[1], protect_cls)))
    if r == 0:
        return x.clone(), torch.ones_like(x[..., :1]) if size is None else size.clone()
    if mode == "prune":
        return _prune(x, size, metric, r, protect_cls)
    unit = _unit_keys(metric)
    if mode == "bipartite":
        if _fused_qualifies(x, size, unit):
            return _fused_bipartite(x, size, unit, r, protect_cls)
        return _bipartite(x, size, unit, r, protect_cls)
    return _transform(x, size, unit, r, protect_cls, spread, temperature)


# -- the IR ops ---------------------------------------------------------------------------------
# Defined with a plain torch.library fragment rather than @custom_op, whose Python wrapper made each
# merge measurably slower inside a batch-64 ViT.  Gradients (distillation after merging) flow to x only:
# the token plan (which tokens merge where, and the sizes) is treated as a constant, as ToMe's argmax is.
_LIBRARY = torch.library.Library("fxpress", "FRAGMENT")
_LIBRARY.define("merge_tokens(Tensor x, Tensor metric, Tensor? size, SymInt r, str mode, bool protect_cls, "
                "SymInt spread, float temperature) -> (Tensor, Tensor)")
_LIBRARY.define("tail_drop(Tensor x, SymInt keep) -> Tensor")


def _merge_tokens(x: Tensor, metric: Tensor, size: Tensor | None, r: int, mode: str, protect_cls: bool,
                  spread: int, temperature: float) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return reduce_tokens(x, metric, size, r, mode, protect_cls, spread, temperature)


def _merge_tokens_fake(x, metric, size, r, mode, protect_cls, spread, temperature):
    removed = torch.sym_max(0, torch.sym_min(r, max_merge(x.shape[1], protect_cls)))
    tokens = x.shape[1] - removed
    return x.new_empty(x.shape[0], tokens, x.shape[2]), x.new_empty(x.shape[0], tokens, 1)


def _tail_drop(x: Tensor, keep: int) -> Tensor:
    return x[:, :keep].clone()


def _tail_drop_fake(x, keep):
    return x.new_empty(x.shape[0], torch.sym_min(keep, x.shape[1]), *x.shape[2:])


_LIBRARY.impl("merge_tokens", _merge_tokens, "CompositeExplicitAutograd")
_LIBRARY.impl("tail_drop", _tail_drop, "CompositeExplicitAutograd")
torch.library.register_fake("fxpress::merge_tokens", _merge_tokens_fake, lib=_LIBRARY)
torch.library.register_fake("fxpress::tail_drop", _tail_drop_fake, lib=_LIBRARY)


def _merge_setup(ctx, inputs, output) -> None:
    ctx.inputs = inputs


def _merge_backward(ctx, grad_tokens, grad_size):
    """d x' / d x with the plan fixed: the merge is linear in x, so recompute it with grad on x alone."""
    x, metric, size, *options = ctx.inputs
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        merged, _ = reduce_tokens(leaf, metric.detach(), None if size is None else size.detach(), *options)
        (grad_x,) = torch.autograd.grad(merged, leaf, grad_tokens)
    return grad_x, None, None, None, None, None, None, None


def _tail_drop_setup(ctx, inputs, output) -> None:
    ctx.shape = inputs[0].shape


def _tail_drop_backward(ctx, grad):
    full = grad.new_zeros(ctx.shape)
    full[:, :grad.shape[1]] = grad
    return full, None


torch.library.register_autograd("fxpress::merge_tokens", _merge_backward, setup_context=_merge_setup,
                                lib=_LIBRARY)
torch.library.register_autograd("fxpress::tail_drop", _tail_drop_backward, setup_context=_tail_drop_setup,
                                lib=_LIBRARY)

MERGE_TOKENS = torch.ops.fxpress.merge_tokens.default  # (x', size') = T-reduction of x; see the module doc
TAIL_DROP = torch.ops.fxpress.tail_drop.default  # x[:, :keep]


def merge_tokens_macs(node: Any, arg_shapes: list, out: Any) -> int:
    """MACs of one merge_tokens call, by mode (B batch, N tokens, C channels, c metric width, r removed):

    bipartite  B * ceil(N/2) * floor(N/2) * c   (A tokens against B tokens)  + B * r * C  (moved tokens)
    transform  bipartite's similarity + B * r * (N - r) * c (removed against kept) + B * r * spread * C
    prune      0: it only selects; the importance it reads was computed (and counted) before it
    """
    tokens, metric = arg_shapes[0], arg_shapes[1]
    args = list(node.args) + [None] * (8 - len(node.args))
    r, mode, protect_cls, spread = args[3], args[4], args[5], args[6]
    if not tokens or not metric or not isinstance(r, int) or mode == "prune":
        return 0
    batch, count, channels = tokens[0], tokens[1], tokens[-1]
    removed = max(0, min(r, max_merge(count, bool(protect_cls))))
    if removed == 0:
        return 0
    similarity = batch * ((count + 1) // 2) * (count // 2) * metric[-1]
    if mode == "bipartite":
        return similarity + batch * removed * channels
    kept = count - removed
    targets = min(int(spread), kept - int(bool(protect_cls)))
    return similarity + batch * removed * kept * metric[-1] + batch * removed * targets * channels


def channel_coupling(ctx: Any) -> None:
    """Coupling rule of the token ops: channels (the last axis) pass through unchanged, tokens do not.

    A mask that is the same for every token (removed channels, heads) maps onto the output's channels
    and back; a mask that singles out token positions cannot be followed through a merge."""
    multi = ctx.node.target == MERGE_TOKENS
    out_item = 0 if multi else None

    def per_channel(mask: Tensor) -> Tensor:
        if mask.dim() < 2 or mask.shape[-2] != 1:
            raise ctx.fail("a mask over token positions cannot be followed through a token merge; only channels "
                           "(the last axis) can be pruned across it")
        return mask

    found = ctx.mask(ctx.node.args[0])
    if found is not None:
        ctx.couple(ctx.node, per_channel(found), out_item)
    found = ctx.mask(ctx.node, out_item)
    if found is not None:
        ctx.couple(ctx.node.args[0], per_channel(found))


define_op(OpInfo(MERGE_TOKENS, "tokens", merge_tokens_macs, doc="(x', size') = T-reduction of x",
                 coupling=channel_coupling))
define_op(OpInfo(TAIL_DROP, "tokens", doc="x[:, :keep]", coupling=channel_coupling))
TOKEN_OPS = (MERGE_TOKENS, TAIL_DROP)


# -- r schedules ---------------------------------------------------------------------------------
def r_schedule(r: int, depth: int, schedule: str) -> list[int]:
    """Tokens to remove per block: `constant` r, or `decreasing` from 1.5r to 0.5r (ToMe's inflect=-0.5)."""
    if schedule == "constant" or depth == 1:
        return [r] * depth
    if schedule != "decreasing":
        raise ValueError(f"unknown schedule {schedule!r}; choose constant or decreasing")
    first, last = int(r * 1.5), 2 * r - int(r * 1.5)
    step = (last - first) / (depth - 1)
    return [int(first + step * i) for i in range(depth)]
