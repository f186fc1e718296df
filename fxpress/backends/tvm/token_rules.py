"""TVM lowering rules for the token ops that merge-tokens and tail-drop insert (see passes/token_ops.py).

``fxpress::merge_tokens`` lowers every mode to the reference's one form,
``X' = T X`` with ``T = W diag(s) / (W s)`` and ``s' = W s``, where ``W``
(B, N', N) holds how much of token t goes to output slot j:

- a plan in TE gives each token its destination slot (``dest``, B x N):
  bipartite/transform take each A token's best B match (first maximum)
  from the cosine scores (a Relax matmul) and rank the A tokens by it with
  pairwise counts, ``rank_i = #{k: s_k > s_i or (s_k == s_i and k < i)}``:
  the reference's stable descending argsort, exact on ties, and cheap for
  the few dozen tokens of a merge;
- ``bipartite``: W is one-hot on ``dest``; ``transform``: a removed token's
  row is its ``spread`` most similar kept slots (picked one at a time,
  ties to the lower slot) weighted by ``softmax(cos / temperature)``;
- T and s' come from one TE function, and ``T @ X`` is a Relax matmul, so the
  CPU matmul schedule (schedules.py) runs the heavy part.

``prune`` keeps the N - r most important tokens in order (ranked the same
way, ties to the lower index) and gathers their rows.  Every mode breaks
ties as the reference does (its top-k is a stable sort), so results match on
exact ties too.

The token count and r must be static (a SymInt r or token count is a
LoweringError naming the node: compile with ``dynamic=False``); the batch
may be symbolic.  The plan functions carry their own small schedule.

prop_attn's ``add(log(s), logits, alpha=c)`` needs the ``aten::add`` rule of
:mod:`.aten_rules` (TVM 0.27's importer drops alpha).
"""
from __future__ import annotations

from typing import Any

import torch.fx

from fxpress.backends.tvm.rules import RuleContext, op_name, register_lowering, relax_shape, static_int
from fxpress.backends.tvm.schedule_utils import root_block
from fxpress.errors import LoweringError
from fxpress.ops.tokens import MODES, max_merge



# -- arguments ------------------------------------------------------------------------------------
def _static_int(node: torch.fx.Node, value: Any, what: str) -> int:
    return static_int(node, value, what, "compile with dynamic=False (or capture with a static sequence length)")


def _unpack(node: torch.fx.Node, values: list[Any]) -> tuple:
    """(x, metric, size, r, mode, protect_cls, spread, temperature) with defaults and static ints."""
    defaults = [None, None, None, None, "bipartite", True, 3, 0.1]
    values = values + defaults[len(values):]
    for index, name in enumerate(("mode", "protect_cls", "spread", "temperature"), start=4):
        if name in node.kwargs:
            values[index] = node.kwargs[name]
    x, metric, size, r, mode, protect, spread, temperature = values
    if mode not in MODES:
        raise LoweringError(f"{op_name(node.target)} at node {node.format_node()}: unknown mode {mode!r}; "
                            f"choose one of {', '.join(MODES)}")
    r = _static_int(node, r, "r")
    tokens = _static_int(node, relax_shape(x)[1], "token count")
    return x, metric, size, max(0, min(r, max_merge(tokens, bool(protect)))), mode, bool(protect), \
        _static_int(node, spread, "spread"), float(temperature)


# -- TE pieces --------------------------------------------------------------------------------------
def _before(value_a, index_a, value_b, index_b):
    """Does (value_a, index_a) come first in a stable descending sort?"""
    from tvm import tirx

    return tirx.Or(value_a > value_b, tirx.And(value_a == value_b, index_a < index_b))


def _rank(key):
    """rank[b, i] = #{k: key[b, k] before key[b, i]}: the stable descending argsort's inverse."""
    from tvm import te, tirx

    other = te.reduce_axis((0, key.shape[1]), "other")
    return te.compute(key.shape, lambda b, i: te.sum(
        tirx.Select(_before(key[b, other], other, key[b, i], i), tirx.const(1, "int64"), tirx.const(0, "int64")),
        axis=other), name="rank")


def _inf(dtype: str, sign: float):
    from tvm import tirx

    return tirx.const(sign * float("inf"), dtype)


def bipartite_destinations(scores, tokens: int, r: int, protect: bool):
    """dest[b, t]: output slot of token t, from A-major scores (B, A tokens, B tokens); merged A -> its match."""
    from tvm import te, tirx

    batch, a_count, b_count = scores.shape
    kept_a = int(a_count) - r
    j = te.reduce_axis((0, b_count), "j")
    best = te.compute((batch, a_count), lambda b, a: te.max(scores[b, a, j], axis=j), name="best")
    k = te.reduce_axis((0, b_count), "k")
    match = te.compute((batch, a_count), lambda b, a: te.min(
        tirx.Select(scores[b, a, k] == best[b, a], k.var.astype("int64"), tirx.const(int(b_count), "int64")), axis=k),
        name="match")
    key = te.compute((batch, a_count), lambda b, a: tirx.Select(
        tirx.And(tirx.const(protect, "bool"), a == 0), _inf(scores.dtype, -1), best[b, a]), name="key")
    rank = _rank(key)
    o = te.reduce_axis((0, a_count), "o")
    one, zero = tirx.const(1, "int64"), tirx.const(0, "int64")
    pos = te.compute((batch, a_count), lambda b, a: te.sum(
        tirx.Select(tirx.And(o < a, rank[b, o] >= r), one, zero), axis=o) if protect else rank[b, a] - r,
        name="pos")

    def dest(b, t):
        a = t // 2
        a_slot = tirx.Select(rank[b, a] < r, kept_a + match[b, a], pos[b, a])
        return tirx.Select(t % 2 == 1, (kept_a + a).astype("int64"), a_slot)

    return te.compute((batch, tokens), dest, name="dest")


def spread_weights(similarity, dest, out_tokens: int, kept_a: int, protect: bool, spread: int, temperature: float):
    """W for transform: kept tokens one-hot; a removed token over its `spread` most similar kept slots."""
    from tvm import te, tirx

    batch, tokens, _ = similarity.shape
    dtype = similarity.dtype
    removed = lambda b, t: tirx.And(t % 2 == 0, dest[b, t] >= kept_a)  # noqa: E731
    picks = []  # (value, slot) of each pick, best first; ties to the lower slot
    for step in range(min(spread, out_tokens - int(protect))):
        def allowed(b, t, u, prev=tuple(picks)):
            ok = tirx.Not(removed(b, u))
            if protect:
                ok = tirx.And(ok, u != 0)
            if prev:
                value, slot = prev[-1]
                ok = tirx.And(ok, _before(value[b, t], slot[b, t], similarity[b, t, u], dest[b, u]))
            return ok
        u = te.reduce_axis((0, tokens), "u")
        value = te.compute((batch, tokens), lambda b, t: te.max(tirx.Select(
            allowed(b, t, u), similarity[b, t, u], _inf(dtype, -1)), axis=u), name=f"value{step}")
        w = te.reduce_axis((0, tokens), "w")
        slot = te.compute((batch, tokens), lambda b, t: te.min(tirx.Select(
            tirx.And(allowed(b, t, w), similarity[b, t, w] == value[b, t]), dest[b, w],
            tirx.const(out_tokens, "int64")), axis=w), name=f"slot{step}")
        picks.append((value, slot))
    scale = tirx.const(temperature, dtype)
    top = picks[0][0]
    exps = [te.compute((batch, tokens), _softmax_term(value, top, scale), name=f"exp{i}")
            for i, (value, _) in enumerate(picks)]

    def weight(b, j, t):
        denominator = sum((e[b, t] for e in exps[1:]), exps[0][b, t])
        spread_share = sum((tirx.Select(slot[b, t] == j, e[b, t], tirx.const(0, dtype))
                            for e, (_, slot) in zip(exps, picks)), tirx.const(0, dtype)) / denominator
        own = tirx.Select(dest[b, t] == j, tirx.const(1, dtype), tirx.const(0, dtype))
        return tirx.Select(removed(b, t), spread_share, own)

    return te.compute((batch, out_tokens, tokens), weight, name="weight")


def _softmax_term(value, top, scale):
    """exp(v / temperature - max / temperature), as torch.softmax(best / temperature) computes it."""
    from tvm import te

    return lambda b, t: te.exp(value[b, t] / scale - top[b, t] / scale)


def _normalized(weight, shape, size):
    """[T, s'] with s'[b, j] = sum_t W[b, j, t] s_t and T = W diag(s) / s' (size None: all ones)."""
    from tvm import te

    mass = weight if size is None else (lambda b, j, t: weight(b, j, t) * size[b, t, 0])
    t = te.reduce_axis((0, shape[2]), "t")
    total = te.compute(shape[:2], lambda b, j: te.sum(mass(b, j, t), axis=t), name="total")
    transform = te.compute(shape, lambda b, j, t: mass(b, j, t) / total[b, j], name="transform")
    return [transform, total]


def one_hot_transform(dest, size, out_tokens: int, dtype: str):
    """[T, s'] for W one-hot on `dest` (bipartite: every token goes whole to one slot)."""
    from tvm import tirx

    batch, tokens = dest.shape
    weight = lambda b, j, t: tirx.Select(dest[b, t] == j, tirx.const(1, dtype), tirx.const(0, dtype))  # noqa: E731
    return _normalized(weight, (batch, out_tokens, tokens), size)


def normalized_transform(weight, size):
    """[T, s'] for a computed W (transform)."""
    return _normalized(lambda b, j, t: weight[b, j, t], tuple(weight.shape), size)


def prune_sources(importance, keep: int, protect: bool):
    """src[b, j]: the j-th kept token (in order) of the `keep` most important, ties to the lower index."""
    from tvm import te, tirx

    batch, tokens = importance.shape
    key = te.compute(importance.shape, lambda b, t: tirx.Select(
        tirx.And(tirx.const(protect, "bool"), t == 0), _inf(importance.dtype, 1), importance[b, t]), name="key")
    rank = _rank(key)
    one, zero = tirx.const(1, "int64"), tirx.const(0, "int64")
    u = te.reduce_axis((0, tokens), "u")
    slot = te.compute(importance.shape, lambda b, t: te.sum(
        tirx.Select(tirx.And(u < t, rank[b, u] < keep), one, zero), axis=u), name="slot")
    v = te.reduce_axis((0, tokens), "v")
    return te.compute((batch, keep), lambda b, j: te.sum(tirx.Select(
        tirx.And(rank[b, v] < keep, slot[b, v] == j), v.var.astype("int64"), zero), axis=v), name="src")


def gather_tokens(x, size, src):
    """[x[b, src[b, j]], size[b, src[b, j]]] (size None: ones)."""
    from tvm import te, tirx

    batch, keep = src.shape
    rows = te.compute((batch, keep, x.shape[2]), lambda b, j, c: x[b, src[b, j], c], name="rows")
    sizes = te.compute((batch, keep, 1), lambda b, j, c: tirx.const(1, x.dtype) if size is None
                       else size[b, src[b, j], c], name="sizes")
    return [rows, sizes]


# -- Relax ----------------------------------------------------------------------------------------
def _emit_scheduled(ctx: RuleContext, compute, *args, name: str):
    """emit_te, then our own schedule (each block parallel over the batch), marked scheduled.

    The default CPU rules would otherwise try them: dlight's cpu.Reduction raises on a function
    that chains several reductions (``The block ... is an output block``); the plan's loops are tiny.
    """
    from tvm import s_tir

    var = ctx.emit_te(compute, *args, name=name)
    global_var = ctx.bb.lookup_binding(var).args[0]
    sch = s_tir.Schedule(ctx.bb.get()[global_var])
    for block in sch.get_child_blocks(root_block(sch)):
        sch.parallel(sch.get_loops(block)[0])
    ctx.bb.update_func(global_var, sch.mod["main"].with_attr("tirx.is_scheduled", True))
    return var


def _unit_keys(bb, metric):
    """Keys summed over heads (B, N, c) and scaled to unit length, as in the reference."""
    from tvm import relax

    total = bb.emit(relax.op.sum(metric, axis=[1])) if len(relax_shape(metric)) == 4 else metric
    norm = bb.emit(relax.op.sqrt(relax.op.sum(relax.op.multiply(total, total), axis=[-1], keepdims=True)))
    return bb.emit(relax.op.divide(total, norm))


def _every_other(bb, unit, start: int, tokens: int):
    from tvm import relax

    return bb.emit(relax.op.strided_slice(unit, axes=[1], begin=[start], end=[tokens], strides=[2]))


def _merge(ctx: RuleContext, x, metric, size, r: int, mode: str, protect: bool, spread: int,
           temperature: float):
    from tvm import relax

    bb, tokens = ctx.bb, int(relax_shape(x)[1])
    dtype = str(x.ty.dtype)
    unit = _unit_keys(bb, metric)
    a_keys, b_keys = _every_other(bb, unit, 0, tokens), _every_other(bb, unit, 1, tokens)
    scores = bb.emit(relax.op.matmul(a_keys, relax.op.permute_dims(b_keys, [0, 2, 1])))
    dest = _emit_scheduled(ctx, bipartite_destinations, scores, tokens, r, protect, name="fxpress_merge_plan")
    out_tokens = tokens - r
    if mode == "bipartite":
        pair = _emit_scheduled(ctx, one_hot_transform, dest, size, out_tokens, dtype, name="fxpress_merge_transform")
    else:
        similarity = bb.emit(relax.op.matmul(unit, relax.op.permute_dims(unit, [0, 2, 1])))
        weight = _emit_scheduled(ctx, spread_weights, similarity, dest, out_tokens, (tokens + 1) // 2 - r,
                                 protect, spread, temperature, name="fxpress_transform_weights")
        pair = _emit_scheduled(ctx, normalized_transform, weight, size, name="fxpress_merge_transform")
    merged = bb.emit(relax.op.matmul(bb.emit(relax.TupleGetItem(pair, 0)), x))
    total = bb.emit(relax.op.expand_dims(bb.emit(relax.TupleGetItem(pair, 1)), -1))
    return relax.Tuple([merged, total])


def _prune(ctx: RuleContext, x, importance, size, r: int, protect: bool):
    from tvm import relax

    src = _emit_scheduled(ctx, prune_sources, importance, int(relax_shape(x)[1]) - r, protect, name="fxpress_prune_plan")
    pair = ctx.emit_te(gather_tokens, x, size, src, name="fxpress_prune_gather")
    return relax.Tuple([ctx.bb.emit(relax.TupleGetItem(pair, 0)), ctx.bb.emit(relax.TupleGetItem(pair, 1))])


@register_lowering("fxpress::merge_tokens")
def lower_merge_tokens(ctx: RuleContext, node: torch.fx.Node):
    """merge_tokens(x, metric, size, r, mode, ...) -> (T X, W s) with T, W as in the module doc."""
    from tvm import relax

    x, metric, size, r, mode, protect, spread, temperature = _unpack(node, ctx.args(node))
    if r == 0:
        ones = relax.op.ones(relax.ShapeExpr(relax_shape(x)[:2] + [1]), str(x.ty.dtype))
        return relax.Tuple([x, size if size is not None else ctx.bb.emit(ones)])
    if mode == "prune":
        return _prune(ctx, x, metric, size, r, protect)
    return _merge(ctx, x, metric, size, r, mode, protect, spread, temperature)


@register_lowering("fxpress::tail_drop")
def lower_tail_drop(ctx: RuleContext, node: torch.fx.Node):
    """tail_drop(x, keep) -> x[:, :keep]."""
    from tvm import relax

    x, keep = ctx.args(node)[:2]
    keep = _static_int(node, keep, "keep")
    return ctx.bb.emit(relax.op.strided_slice(x, axes=[1], begin=[0], end=[keep]))  # clamps keep > N
