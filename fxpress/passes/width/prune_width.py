"""prune-width: the least important attention heads, key/value heads, MLP neurons and hidden channels -> removed.

Minitron's width pruning.  Units come from the dimension flow
(`fxpress.analysis.width_units`): query heads and key/value heads of each
attention, neurons of each MLP, hidden (embedding) channels.  Targets are
the counts to keep, the same in every block: ``heads=6`` keeps 6 query heads
per attention, ``kv_heads=2`` 2 key/value heads, ``mlp=1024`` 1024 neurons,
``embed=512`` 512 hidden channels.

Grouped-query attention: a key/value head goes with its query group (its
score is the sum of its query heads'), and query heads are pruned within
the kept groups, the same number in each, so every KV head keeps
``heads / kv_heads`` readers.

Importance (higher = keep), on calibration batches, from the input of the
layer that reads the units (o_proj for heads, down_proj for neurons, every
layer reading the residual stream for hidden channels):

- ``activation`` (Minitron): the per-token norm of the unit's activation;
- ``contribution`` (default): the per-token norm of what the unit adds to
  the residual stream (activation times the reader's columns).  On
  SmolLM2, query heads 9 -> 6 by contribution cost perplexity 163 where
  activation costs 778 (MLP neurons: 86 and 83);
- ``taylor``: |sum of w * dL/dw| over the unit's parameter slices
  (first-order change of the task loss `ctx.task_loss` when it goes);
- ``magnitude``: the L2 norm of the unit's parameter slices (no data);
- ``random``: seeded by ``ctx.seed`` (the baseline every criterion must beat).

Per-token scores are aggregated over batch and sequence by ``aggregation``:
``mean``, ``l2`` (root mean square) or ``var`` (variance).  The result is a
smaller dense model; `fxpress.export.hf.export_hf` writes the new config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import Node

from fxpress.analysis.blocks import no_blocks_reason
from fxpress.analysis.dimension_flow import DimensionGroup, dimension_group
from fxpress.analysis.manager import MainBlockStack
from fxpress.analysis.recorder import ValueRecorder
from fxpress.analysis.width_units import AttentionUnits, UnitFamily, block_units, hidden_units
from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph
from fxpress.passes.depth.distill import clone_for_training
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.losses import looks_like_lm
from fxpress.passes.infra.registry import register_pass
from fxpress.passes.width.shrink import shrink

Importance = Literal["activation", "contribution", "taylor", "magnitude", "random"]
Aggregation = Literal["mean", "l2", "var"]


class _Moments:
    """Running sum, sum of squares and count of per-token scores, per unit."""

    def __init__(self, units: int):
        self.total = torch.zeros(units, dtype=torch.float64)
        self.squares = torch.zeros(units, dtype=torch.float64)
        self.count = 0

    def add(self, scores: torch.Tensor) -> None:  # (tokens, units)
        scores = scores.double()
        self.total += scores.sum(0)
        self.squares += (scores ** 2).sum(0)
        self.count += scores.shape[0]

    def aggregate(self, how: str) -> torch.Tensor:
        mean = self.total / max(self.count, 1)
        if how == "mean":
            return mean
        second = self.squares / max(self.count, 1)
        return second.sqrt() if how == "l2" else (second - mean ** 2).clamp_min(0)


def _unit_scores(x: torch.Tensor, columns: list[list[int]], weight: torch.Tensor | None) -> torch.Tensor:
    """(tokens, units) per-token norm of each unit's activation (or its contribution through `weight`)."""
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    if all(len(c) == 1 for c in columns):
        index = torch.tensor([c[0] for c in columns])
        scores = rows[:, index].abs()
        if weight is not None:
            scores = scores * weight.detach().float()[:, index].norm(dim=0)
        return scores
    out = []
    for cols in columns:
        part = rows[:, cols]
        out.append((part @ weight.detach().float()[:, cols].T if weight is not None else part).norm(dim=-1))
    return torch.stack(out, dim=1)


def _shared_scores(graph: Graph, families: list[UnitFamily], scores: dict[int, torch.Tensor]
                   ) -> dict[int, torch.Tensor]:
    """Families whose parameters are one set of tensors (blocks sharing weights after share-weights) get the
    sum of their scores, so they choose the same units and the shared tensors are cut once."""
    by_tensors: dict[tuple, list[UnitFamily]] = {}
    for family in families:
        key = (family.kind, tuple(sorted({id(graph.attribute(s.path)) for s in family.unit_slices[0]})))
        by_tensors.setdefault(key, []).append(family)
    combined = dict(scores)
    for members in by_tensors.values():
        if len(members) > 1:
            total = sum(scores[id(f)] for f in members)
            for family in members:
                combined[id(family)] = total
    return combined


@register_pass
@dataclass(frozen=True)
class PruneWidth(Pass):
    """units -> removed: the least important heads, KV heads, MLP neurons and hidden channels of every block."""

    name: ClassVar[str] = "prune-width"
    preserves_semantics: ClassVar[bool] = False
    heads: int | None = None  # query heads to keep per attention
    kv_heads: int | None = None  # key/value heads to keep per attention (grouped-query)
    mlp: int | None = None  # MLP neurons to keep per block
    embed: int | None = None  # hidden (embedding) channels to keep
    importance: Importance = "contribution"  # measured best on SmolLM2 heads (see docs/pruning.md)
    aggregation: Aggregation = "mean"
    max_batches: int = 8

    def __post_init__(self) -> None:
        for option in ("heads", "kv_heads", "mlp", "embed"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise self.bad_option(f"{option} is a count to keep and must be >= 1, got {value}")
        if self.max_batches < 1:
            raise self.bad_option("max_batches must be >= 1")

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if self.importance == "taylor":  # the others score on the example inputs when no calibration is given
            ctx.require_calibration(self.name)

    # -- units and scores ------------------------------------------------------------------------
    def _families(self, graph: Graph, ctx: PassContext):
        stack = ctx.analyses.get(graph, MainBlockStack)
        blocks = []
        if self.heads is not None or self.kv_heads is not None or self.mlp is not None:
            if stack is None:
                raise PreconditionError(f"heads/kv_heads/mlp prune inside residual blocks and {graph.name} has "
                                        f"none ({no_blocks_reason(graph)})", self.name)
            blocks = block_units(graph, stack, self.name)
        hidden = hidden_units(graph, self.name) if self.embed is not None else None
        return blocks, hidden

    def _scored(self, graph: Graph, ctx: PassContext, families: list[UnitFamily]) -> dict[int, torch.Tensor]:
        if self.importance == "magnitude":
            return {id(f): self._magnitude(graph, f) for f in families}
        if self.importance == "random":
            generator = ctx.generator()
            return {id(f): torch.rand(f.size, generator=generator, dtype=torch.float64) for f in families}
        if self.importance == "taylor":
            return self._taylor(graph, ctx, families)
        return self._activation(graph, ctx, families)

    @staticmethod
    def _magnitude(graph: Graph, family: UnitFamily) -> torch.Tensor:
        scores = []
        for unit in family.unit_slices:
            total = 0.0
            for piece in unit:
                tensor = graph.attribute(piece.path).detach().float()
                total += float(tensor.index_select(piece.dim, torch.tensor(piece.indices)).pow(2).sum())
            scores.append(math.sqrt(total))
        return torch.tensor(scores, dtype=torch.float64)

    def _activation(self, graph: Graph, ctx: PassContext, families: list[UnitFamily]) -> dict[int, torch.Tensor]:
        contribution = self.importance == "contribution"
        wanted: dict[str, list[tuple[list[list[int]], torch.Tensor | None, _Moments]]] = {}
        moments: list[tuple[int, _Moments]] = []
        for family in families:
            seen_inputs = set()
            for reader, columns in family.readers:
                source = reader.args[0]
                if not isinstance(source, Node) or source.name in seen_inputs:
                    continue  # q, k and v read one normalized input: count it once
                seen_inputs.add(source.name)
                weight = graph.attribute(str(reader.args[1].target)) if contribution else None
                moment = _Moments(family.size)
                moments.append((id(family), moment))
                wanted.setdefault(source.name, []).append((columns, weight, moment))
        recorder = ValueRecorder(graph, list(wanted))
        recorder.add_observer(lambda node, value: [m.add(_unit_scores(value, cols, w))
                                                   for cols, w, m in wanted[node.name]])
        batches = ctx.batches(graph)[: self.max_batches]
        for batch in ctx.progress.track(batches, f"{self.name}: {self.importance} importance", total=len(batches)):
            recorder.run_batch(batch)
        scores: dict[int, torch.Tensor] = {}
        for family_id, moment in moments:
            value = moment.aggregate(self.aggregation)
            scores[family_id] = value if family_id not in scores else scores[family_id] + value
        return scores

    def _taylor(self, graph: Graph, ctx: PassContext, families: list[UnitFamily]) -> dict[int, torch.Tensor]:
        paths = sorted({s.path for f in families for unit in f.unit_slices for s in unit})
        student = graph.copy()
        params = clone_for_training(student, paths)
        by_path = {p: student.attribute(p) for p in paths}
        totals = {id(f): torch.zeros(f.size, dtype=torch.float64) for f in families}
        batches = ctx.require_calibration(self.name)[: self.max_batches]
        for batch in ctx.progress.track(batches, f"{self.name}: taylor importance", total=len(batches)):
            with torch.enable_grad():
                output = student.module(*batch)
                if ctx.loss is None and not looks_like_lm(batch, output):
                    raise PreconditionError("importance=taylor needs the gradient of a task loss and the output is "
                                            "not causal-LM logits; set PassContext(loss=...) (e.g. "
                                            "fxpress.training.losses.contrastive_loss for encoders) or use "
                                            "importance=activation", self.name)
                loss = ctx.task_loss(output, batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            grad_of = {id(p): g for p, g in zip(params, grads)}
            products = {path: (t.detach() * grad_of[id(t)]).double() if grad_of.get(id(t)) is not None else None
                        for path, t in by_path.items()}
            for family in families:
                for unit, pieces in enumerate(family.unit_slices):
                    total = sum(float(products[p.path].index_select(p.dim, torch.tensor(p.indices)).sum())
                                for p in pieces if products[p.path] is not None)
                    totals[id(family)][unit] += abs(total)
        return totals

    # -- choices ---------------------------------------------------------------------------------
    def _attention_groups(self, graph: Graph, attention: AttentionUnits, scores: torch.Tensor,
                          stats: dict) -> list[DimensionGroup]:
        heads, kv = attention.heads.size, attention.kv_heads
        grouped = kv < heads
        kv_keep = self.kv_heads if grouped else None
        if not grouped and self.kv_heads is not None and self.heads is not None and self.kv_heads != self.heads:
            raise PreconditionError(f"{attention.heads.scope} has one key/value head per query head; give heads "
                                    "or kv_heads (they are the same here), not two different counts", self.name)
        heads_keep = self.heads if self.heads is not None else (self.kv_heads if not grouped else None)
        kv_keep = kv_keep if kv_keep is not None else kv
        if kv_keep > kv:
            raise PreconditionError(f"kv_heads={kv_keep} exceeds the {kv} key/value heads of "
                                    f"{attention.heads.scope}", self.name)
        per_group = heads // kv
        if heads_keep is None:
            heads_keep = per_group * kv_keep
        if heads_keep > heads:
            raise PreconditionError(f"heads={heads_keep} exceeds the {heads} query heads of "
                                    f"{attention.heads.scope}", self.name)
        if grouped and (heads_keep % kv_keep or heads_keep // kv_keep > per_group):
            raise PreconditionError(
                f"heads={heads_keep} cannot be split evenly over {kv_keep} kept key/value heads of "
                f"{attention.heads.scope} (at most {per_group} query heads each, at least one per group); "
                f"use a multiple of {kv_keep}", self.name)
        keep_each = heads_keep // kv_keep if grouped else heads_keep
        groups = []
        if grouped:
            group_scores = torch.zeros(kv, dtype=torch.float64)
            for h, j in enumerate(attention.group_of):
                group_scores[j] += scores[h]
            kept_kv = sorted(torch.argsort(group_scores, descending=True, stable=True)[:kv_keep].tolist())
            removed_kv = [j for j in range(kv) if j not in kept_kv]
            removed_q = []
            for j in kept_kv:
                members = [h for h, g in enumerate(attention.group_of) if g == j]
                ranked = sorted(members, key=lambda h: (-float(scores[h]), h))
                removed_q += ranked[keep_each:]
            if removed_kv:
                groups.append(dimension_group(graph, attention.kv_seed, attention.kv_axis, removed_kv,
                                              pass_name=self.name))
        else:
            ranked = sorted(range(heads), key=lambda h: (-float(scores[h]), h))
            removed_q = ranked[heads_keep:]
            removed_kv = []
        if removed_q:
            groups.append(dimension_group(graph, attention.heads.seed, attention.heads.axis, sorted(removed_q),
                                          pass_name=self.name))
        stats["heads"] = f"{heads}->{heads_keep}"
        gone = set(removed_q) | {h for h, j in enumerate(attention.group_of) if j in removed_kv}
        stats["removed_heads"] = sorted(gone)
        if grouped:
            stats["kv_heads"] = f"{kv}->{kv_keep}"
            stats["removed_kv_heads"] = removed_kv
        return groups

    def _family_group(self, graph: Graph, family: UnitFamily, keep: int, scores: torch.Tensor
                      ) -> DimensionGroup | None:
        if keep > family.size:
            raise PreconditionError(f"{family.kind} keep count {keep} exceeds the {family.size} units of "
                                    f"{family.scope}", self.name)
        ranked = sorted(range(family.size), key=lambda u: (-float(scores[u]), u))
        removed = sorted(ranked[keep:])
        if not removed:
            return None
        return dimension_group(graph, family.seed, family.axis, removed, pass_name=self.name)

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        if all(getattr(self, o) is None for o in ("heads", "kv_heads", "mlp", "embed")):
            return PassResult(graph, modified=False, stats={"reason": "no target: give heads, kv_heads, mlp or embed"})
        blocks, hidden = self._families(graph, ctx)
        families: list[UnitFamily] = []
        for block, attentions, mlps in blocks:
            if (self.heads is not None or self.kv_heads is not None) and not attentions:
                raise PreconditionError(f"block {block.path} has no attention whose head axis can be found "
                                        "(scaled_dot_product_attention, or softmax(q @ k^T) @ v on (batch, heads, "
                                        "tokens, head_dim)); prune mlp/embed only", self.name)
            if self.mlp is not None and not mlps:
                raise PreconditionError(f"block {block.path} has no MLP (a linear whose outputs only another "
                                        "linear of the block reads)", self.name)
            if self.heads is not None or self.kv_heads is not None:
                families += [a.heads for a in attentions]
            if self.mlp is not None:
                families += mlps
        if hidden is not None:
            families.append(hidden)
        scores = _shared_scores(graph, families, self._scored(graph, ctx, families))
        groups: list[DimensionGroup] = []
        layers: dict[str, dict] = {}
        for block, attentions, mlps in blocks:
            entry = layers.setdefault(block.path, {})
            if self.heads is not None or self.kv_heads is not None:
                for attention in attentions:
                    groups += self._attention_groups(graph, attention, scores[id(attention.heads)], entry)
            if self.mlp is not None:
                for family in mlps:
                    group = self._family_group(graph, family, self.mlp, scores[id(family)])
                    groups += [group] if group else []
                    entry["mlp"] = f"{family.size}->{self.mlp}"
        if hidden is not None:
            group = self._family_group(graph, hidden, self.embed, scores[id(hidden)])
            groups += [group] if group else []
        stats = {"importance": self.importance, "aggregation": self.aggregation, "layers": layers}
        if hidden is not None:
            stats["embed"] = f"{hidden.size}->{self.embed}"
        if not groups:
            return PassResult(graph, modified=False, stats={**stats, "reason": "every target keeps every unit"})
        new = shrink(graph, groups, self.name)
        stats["removed_params"] = graph.num_params - new.num_params
        return PassResult(new, modified=True, stats=stats)
