"""merge-tokens: x + attn(x) -> merge_tokens(x + attn(x), keys): fewer tokens after every attention.

Inserts `fxpress::merge_tokens` (see token_ops.py) between the attention
residual add and the MLP of every transformer block found by pattern
(transformer_blocks.py), so the MLP and every later block see r fewer tokens:

    x = x + attn(norm1(x))                       x = x + attn(norm1(x), bias=log(size))
    x = x + mlp(norm2(x))          ->            x, size = merge_tokens(x, mean_heads(k), size, r_i, mode)
                                                 x = x + mlp(norm2(x))

Token sizes flow from block to block (size-weighted averages); with
`prop_attn` every attention after the first merge adds log(size) to its
logits before the softmax (or as the SDPA mask).  Downstream sizes are made
generic in the token count (token_axes.py, token_resize.py), so the graph
runs on any batch, and on any sequence length when captured dynamic.

With `protect_cls`, a merge after the last attention is skipped when the
outputs read only token 0 from there on (a ViT's CLS classifier): it could
not change them, and at small widths the op costs more than the MLP work it
saves.  `skipped_blocks` in the stats lists such blocks.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch.fx import Node

from fxpress.errors import PreconditionError
from fxpress.ir.builder import Builder, Inserter
from fxpress.ir.graph import Graph
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass
from fxpress.analysis.token_flow import reads_only_first_token, shape_of, trace_token_axes
from fxpress.ops.tokens import MERGE_TOKENS, max_merge, r_schedule
from fxpress.passes.tokens.resize import apply_size_patches, foreign_values, resolve_foreign_inputs
from fxpress.analysis.manager import TransformerBlocks
from fxpress.analysis.attention import TransformerBlock, find_transformer_blocks, token_count

aten = torch.ops.aten
NO_BLOCKS = "no transformer blocks found (no residual add after a softmax/SDPA attention): nothing to do"


@dataclass
class TokenPlan:
    """Tokens removed per block after clamping, and the token counts they give."""

    removed: list[int]
    tokens_attention: list[int]  # tokens each block's attention sees
    tokens_mlp: list[int]  # tokens each block's MLP (and the next block) sees
    clamped: list[int] = field(default_factory=list)  # blocks whose r was cut to half the tokens


def plan_tokens(blocks: list[TransformerBlock], wanted: list[int], protect_cls: bool) -> TokenPlan:
    """Clamp each block's r to what the bipartite split allows on the example inputs' token count."""
    tokens = token_count(blocks[0])
    plan = TokenPlan([], [], [])
    for index, r in enumerate(wanted):
        limit = max(0, max_merge(tokens, protect_cls))
        if r > limit:
            plan.clamped.append(index)
        plan.removed.append(min(r, limit))
        plan.tokens_attention.append(tokens)
        tokens -= plan.removed[-1]
        plan.tokens_mlp.append(tokens)
    return plan


def _keys_metric(at: Inserter, block: TransformerBlock) -> Node:
    """The keys, (B, H, N, d) or (B, N, d): the op averages them over heads for ToMe's metric."""
    key = block.attention.key
    return at.call(aten.transpose.int, key, -2, -1) if block.attention.key_transposed else key


def _logits_bias(at: Inserter, size: Node) -> Node:
    """log(size) shaped (B, 1, 1, N) to add to attention logits."""
    return at.call(aten.unsqueeze.default, at.call(aten.transpose.int, at.call(aten.log.default, size), 1, 2), 1)


def _cls_attention(at: Inserter, block: TransformerBlock, bias: Node | None) -> Node:
    """Attention the CLS query pays to every token, averaged over heads: (B, N)."""
    core = block.attention
    if core.kind == "softmax":
        return at.call(aten.mean.dim, at.call(aten.select.int, core.node, -2, 0), [1])
    scale = core.node.kwargs.get("scale") or 1 / math.sqrt(shape_of(core.query)[-1])
    query = at.call(aten.slice.Tensor, core.query, 2, 0, 1)
    logits = at.call(aten.mul.Tensor, at.call(aten.matmul.default, query, at.call(aten.transpose.int, core.key, -2, -1)),
                     scale)
    if bias is not None:
        logits = at.call(aten.add.Tensor, logits, bias)
    return at.call(aten.mean.dim, at.call(aten.softmax.int, logits, -1), [1, 2])


def _add_to_logits(graph: Graph, build: Builder, softmax: Node, bias: Node) -> None:
    """softmax(l * c) -> softmax(bias + c * l) in one op (add's alpha); else softmax(l) -> softmax(l + bias)."""
    logits = softmax.args[0]
    scaled = (logits.op == "call_function" and logits.target in (aten.mul.Tensor, aten.div.Tensor)
              and len(logits.users) == 1 and isinstance(logits.args[1], (int, float)))
    if scaled:
        alpha = logits.args[1] if logits.target == aten.mul.Tensor else 1 / logits.args[1]
        added = build.call_before(softmax, aten.add.Tensor, bias, logits.args[0], alpha=alpha)
    else:
        added = build.call_before(softmax, aten.add.Tensor, logits, bias)
    softmax.args = (added,) + softmax.args[1:]
    if scaled:
        graph.fx.erase_node(logits)


def _apply_bias(graph: Graph, build: Builder, block: TransformerBlock, bias: Node, pass_name: str) -> None:
    core = block.attention
    if core.kind == "softmax":  # the softmax input may have changed: a neutral mask add is gone
        if len(shape_of(core.node)) != 4:
            raise PreconditionError(f"prop_attn needs (B, heads, N, N) logits, got {list(shape_of(core.node))} "
                                    f"at {core.node.format_node()}; use prop_attn=false", pass_name)
        _add_to_logits(graph, build, core.node, bias)
    elif len(core.node.args) > 3 and core.node.args[3] is None:
        core.node.args = core.node.args[:3] + (bias,) + core.node.args[4:]
    elif core.node.kwargs.get("attn_mask") is None and len(core.node.args) <= 3:
        core.node.kwargs = {**core.node.kwargs, "attn_mask": bias}
    else:
        raise PreconditionError(f"prop_attn cannot combine log(size) with the attention mask of "
                                f"{core.node.format_node()}; use prop_attn=false", pass_name)


def _initial_size(build: Builder, first: TransformerBlock) -> Node:
    """Sizes before the first merge: ones (B, N, 1), made outside the blocks from the stream entering the
    first merging block.  Explicit rather than None so that every merging block reads the sizes it passes
    on: removing or skipping a block then hands its input sizes to the next one."""
    point = first.stream_in
    if point.op == "placeholder":  # the stream is a graph input: after the last input, inputs stay first
        point = [n for n in build.graph.fx.nodes if n.op == "placeholder"][-1]
    with build.after(point, like=first.stream_in) as at:
        last = len(shape_of(first.stream_in)) - 1  # a non-negative dim: TVM's importer wants one
        return at.call(aten.ones_like.default, at.call(aten.slice.Tensor, first.stream_in, last, 0, 1))


def insert_token_reduction(graph: Graph, removed: list[int], pass_: MergeTokens, skip: list[int] = ()) -> dict:
    """Rewrite `graph` in place: a merge op after each block with removed[i] > 0 (see module doc).

    With `pass_.keep_identity` blocks with removed[i] == 0 get an identity merge too, except those in `skip`.
    """
    blocks = find_transformer_blocks(graph)
    merging = [b for b in blocks if removed[b.index] > 0 or (pass_.keep_identity and b.index not in skip)]
    flow = trace_token_axes(graph, {b.attn_residual: b.index for b in merging}, pass_name=pass_.name,
                            select_ok=lambda index: pass_.protect_cls and index == 0)
    values = foreign_values(graph, flow)
    build = Builder(graph, pass_.name)
    biases, size, merged_before = {}, _initial_size(build, merging[0]) if merging else None, False
    for block in blocks:
        if pass_.prop_attn and merged_before:
            with build.before(block.attention.node) as at:
                biases[block.index] = _logits_bias(at, size)
        if block not in merging:
            continue
        with build.before(block.attn_residual.next, like=block.attn_residual) as at:
            metric = (_cls_attention(at, block, biases.get(block.index)) if pass_.mode == "prune"
                      else _keys_metric(at, block))
            merged = at.call(MERGE_TOKENS, block.attn_residual, metric, size, removed[block.index], pass_.mode,
                             pass_.protect_cls, pass_.spread, pass_.temperature)
            tokens, size = at.call(operator.getitem, merged, 0), at.call(operator.getitem, merged, 1)
        block.attn_residual.replace_all_uses_with(tokens, delete_user_cb=lambda user: user is not merged)
        merged_before = True
    patched = apply_size_patches(build, flow)
    resolved = resolve_foreign_inputs(graph, build, flow, {}, values, prefix_slice=False)
    for index, bias in biases.items():
        _apply_bias(graph, build, blocks[index], bias, pass_.name)
    return {"size_patches": patched, "foreign_inputs": resolved, "prop_attn_blocks": sorted(biases)}


@register_pass
@dataclass(frozen=True)
class MergeTokens(Pass):
    """x + attn(x) -> merge_tokens(x + attn(x)): r fewer tokens after each attention (ToMe/transform/prune)."""

    name: ClassVar[str] = "merge-tokens"
    creates: ClassVar[tuple] = (MERGE_TOKENS,)
    preserves_semantics: ClassVar[bool] = False
    r: int = 8
    mode: Literal["bipartite", "transform", "prune"] = "bipartite"
    schedule: Literal["constant", "decreasing"] = "constant"
    protect_cls: bool = True
    prop_attn: bool = True
    spread: int = 3  # transform: kept tokens each removed token is spread over
    temperature: float = 0.1  # transform: softmax temperature on cosine similarity
    keep_identity: bool = False  # insert the op even where a block removes 0 tokens (tests, debugging)

    def __post_init__(self):
        if self.r < 0:
            raise self.bad_option(f"r must be >= 0, got {self.r}")
        if self.spread < 1 or self.temperature <= 0:
            raise self.bad_option("spread must be >= 1 and temperature > 0")

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        existing = sum(node.target == MERGE_TOKENS for node in graph.fx.nodes)
        if existing:
            raise PreconditionError(f"the graph already has {existing} merge_tokens ops and their token sizes "
                                    "cannot be threaded through a second merge; run merge-tokens once, with "
                                    "the total r", self.name)

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        blocks = ctx.analyses.get(graph, TransformerBlocks)
        if not blocks:
            return PassResult(graph, modified=False, stats={"blocks": 0, "reason": NO_BLOCKS})
        wanted = r_schedule(self.r, len(blocks), self.schedule)
        dead = [blocks[-1].index] if self.protect_cls and reads_only_first_token(graph, blocks[-1].attn_residual) \
            else []
        plan = plan_tokens(blocks, [0 if i in dead else r for i, r in enumerate(wanted)], self.protect_cls)
        stats = {"blocks": len(blocks), "r_per_block": plan.removed, "tokens_attention": plan.tokens_attention,
                 "tokens_mlp": plan.tokens_mlp, "tokens_out": plan.tokens_mlp[-1], "clamped_blocks": plan.clamped,
                 "skipped_blocks": dead}
        if not any(plan.removed) and not self.keep_identity:
            return PassResult(graph, modified=False, stats={**stats, "reason": "r=0 in every block: nothing to merge"})
        new = graph.copy()
        stats.update(insert_token_reduction(new, plan.removed, self, dead))
        new.recompile()
        stats.update(macs_before=graph.macs, macs_after=new.macs, macs_ratio=new.macs / max(graph.macs, 1))
        return PassResult(new, modified=True, stats=stats)
