"""remove-layers: the least important residual blocks -> identity (the residual stream skips them).

Block importance (higher = keep), on calibration batches:

- ``angular``: mean over tokens of arccos(cos(x, y)) / pi between a block's
  input x and output y (Minitron's block importance); ``cosine``: 1 - cos
  (ShortGPT's block influence).  One recorded run per batch.
- ``ppl``: loss increase when the block alone is skipped (next-token
  cross-entropy for causal-LM logits, else the relative squared error of
  the output).  One run per block and batch, resumed at the block from a
  recorded run, so the graph before it is not run again.
- ``gate``: FoldGPT-style gates y' = x + g (y - x) on block outputs,
  g in [0, 1] with sum(g) fixed to the number of kept blocks (the target
  ratio), trained by projected gradient steps on the task loss plus a
  polarizing term g (1 - g) that drives gates to 0 or 1; the blocks with
  the smallest final gates go.
- ``last`` (drop the last blocks) and ``random`` (seeded by ctx.seed):
  baselines every metric is measured against.

``keep_first`` / ``keep_last`` protect blocks at either end.

Across processes (torchrun, `fxpress.utils.distributed`): ``angular``, ``cosine``
and ``ppl`` score each process's share of the batches and add the sums up, so
every process gets the same scores and removes the same blocks; ``gate``
training runs whole on every process (same seed, same gates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from fxpress.errors import PipelineError, PreconditionError
from fxpress.ir.graph import Graph
from fxpress.analysis.blocks import BlockRunner, BlockStack, comparable, no_blocks_reason, remove_blocks
from fxpress.analysis.manager import MainBlockStack
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass
from fxpress.utils import distributed

Metric = Literal["angular", "cosine", "ppl", "gate", "last", "random"]
DEFAULT_RATIO = 0.25
GATE_STEP = 0.1  # largest gate change per step
POLARIZE = 0.1  # weight of the polarizing term against the normalized task gradient


def _angular_scores(graph: Graph, stack: BlockStack, batches: list[tuple], metric: str, ctx) -> list[float]:
    totals = [0.0] * len(stack)
    mine = distributed.shard(batches)  # each process scores its share; the sums are added up below
    for batch in ctx.progress.track(mine, f"remove-layers: {metric} importance", total=len(mine)):
        runner = BlockRunner(graph, stack, record=True)
        with torch.no_grad():
            runner(*batch)
        for position in range(len(stack)):
            x, y = comparable(runner.inputs[position], runner.outputs[position])
            cos = F.cosine_similarity(x.flatten(0, -2).double(), y.flatten(0, -2).double(), dim=-1).clamp(-1, 1)
            score = torch.arccos(cos) / math.pi if metric == "angular" else 1 - cos
            totals[position] += float(score.mean()) / len(batches)
    return distributed.sum_floats(totals)


def _skip_scores(graph: Graph, stack: BlockStack, batches: list[tuple], ctx) -> list[float]:
    totals = [0.0] * len(stack)
    mine = distributed.shard(range(len(batches)))  # each process scores its share; the sums are added up below
    steps = [(b, p) for b in mine for p in range(len(stack))]
    recorded: dict[int, tuple] = {}
    for b, position in ctx.progress.track(steps, "remove-layers: ppl importance", total=len(steps)):
        batch = batches[b]
        with torch.no_grad():
            if b not in recorded:
                recorded.clear()
                runner = BlockRunner(graph, stack, record=True)
                full = runner(*batch)
                recorded[b] = (runner, full, float(ctx.task_loss(full, batch, full)))
            runner, full, base = recorded[b]
            skipping = BlockRunner(graph, stack, skip=[position])
            try:
                out = skipping.resume(position, runner.skeleton, runner.inputs[position])
            except ValueError:
                out = skipping(*batch)
            totals[position] += (float(ctx.task_loss(out, batch, full)) - base) / len(batches)
    return distributed.sum_floats(totals)


def project_budget(gates: torch.Tensor, budget: float, iterations: int = 50) -> torch.Tensor:
    """The closest g in [0, 1]^n with sum(g) = budget: clamp(gates - t, 0, 1) with t found by bisection."""
    low, high = float(gates.min()) - 1.0, float(gates.max())
    for _ in range(iterations):
        shift = (low + high) / 2
        if float((gates - shift).clamp(0, 1).sum()) > budget:
            low = shift
        else:
            high = shift
    return (gates - (low + high) / 2).clamp(0, 1)


def _check_gateable(graph: Graph, stack: BlockStack, batch: tuple) -> None:
    """metric=gate interpolates a block's input and output, so both must have one shape."""
    runner = BlockRunner(graph, stack, record=True)
    with torch.no_grad():
        runner(*batch)
    for position, block in enumerate(stack.blocks):
        x, y = runner.inputs[position], runner.outputs[position]
        if x.shape != y.shape:
            raise PreconditionError(f"metric=gate interpolates each block's input and output, but block "
                                    f"{block.path} maps {list(x.shape)} to {list(y.shape)} (a pass before "
                                    "changed its token count); use metric=angular or metric=ppl", RemoveLayers.name)


def _gate_scores(graph: Graph, stack: BlockStack, batches: list[tuple], count: int, steps: int,
                 ctx) -> list[float]:
    n = len(stack)
    _check_gateable(graph, stack, batches[0])
    budget = float(n - count)
    gates = torch.full((n,), budget / n, dtype=torch.float32, requires_grad=True)
    with torch.no_grad():
        references = [graph(*batch) for batch in batches]
    for step in ctx.progress.track(range(steps), "remove-layers: gate training", total=steps):
        batch, reference = batches[step % len(batches)], references[step % len(batches)]
        runner = BlockRunner(graph, stack, transform=lambda p, x, y: x + gates[p] * (y - x))
        with torch.enable_grad():
            loss = ctx.task_loss(runner(*batch), batch, reference)
            (task_grad,) = torch.autograd.grad(loss, [gates])
        with torch.no_grad():
            direction = task_grad / task_grad.abs().max().clamp_min(1e-12)
            direction += POLARIZE * (1 - 2 * gates)  # gradient of mean g(1-g): pushes gates to 0 or 1
            gates.copy_(project_budget(gates - GATE_STEP * direction, budget))
    return gates.detach().tolist()


def block_scores(graph: Graph, stack: BlockStack, metric: str, ctx: PassContext, *, count: int = 1,
                 max_batches: int = 8, gate_steps: int = 20) -> list[float]:
    """Importance of each block of `stack` (higher = more important), by `metric`."""
    n = len(stack)
    if metric == "last":
        return [float(n - p) for p in range(n)]
    if metric == "random":
        order = list(range(n))
        ctx.rng().shuffle(order)
        return [float(order.index(p)) for p in range(n)]
    if metric in ("angular", "cosine"):
        return _angular_scores(graph, stack, ctx.batches(graph)[:max_batches], metric, ctx)
    batches = ctx.require_calibration(RemoveLayers.name)[:max_batches]
    if metric == "ppl":
        return _skip_scores(graph, stack, batches, ctx)
    if metric == "gate":
        return _gate_scores(graph, stack, batches, count, gate_steps, ctx)
    raise PipelineError(f"pass 'remove-layers': unknown metric {metric!r}")


def choose_removals(scores: list[float], count: int, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """Positions of the `count` lowest-scoring blocks outside the protected ends, ascending."""
    eligible = list(range(keep_first, len(scores) - keep_last))
    if count > len(eligible):
        raise PreconditionError(f"cannot remove {count} of {len(scores)} blocks with keep_first={keep_first} "
                                f"and keep_last={keep_last}: only {len(eligible)} may go", RemoveLayers.name)
    return sorted(sorted(eligible, key=lambda p: (scores[p], p))[:count])


def without_blocks(graph: Graph, stack: BlockStack, positions: list[int]) -> Graph:
    """A new graph with blocks[p] -> identity for each position (the input graph is untouched)."""
    new = graph.copy()
    remove_blocks(new, stack, positions)
    return new.recompile()


@register_pass
@dataclass(frozen=True)
class RemoveLayers(Pass):
    """block(x) -> x for the ratio (or count) of least important residual blocks; their params go."""

    name: ClassVar[str] = "remove-layers"
    preserves_semantics: ClassVar[bool] = False
    ratio: float | None = None  # fraction of blocks to remove, in [0, 1); default 0.25 when count is unset
    count: int | None = None  # number of blocks to remove (instead of ratio)
    metric: Metric = "angular"
    keep_first: int = 0  # protect this many blocks at the start
    keep_last: int = 0  # ... and at the end
    max_batches: int = 8  # calibration batches the metric uses
    gate_steps: int = 20  # training steps of the gate metric

    def __post_init__(self) -> None:
        if self.ratio is not None and self.count is not None:
            raise self.bad_option("give ratio or count, not both")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise self.bad_option(f"ratio must be in [0, 1), got {self.ratio}")
        if self.count is not None and self.count < 0:
            raise self.bad_option(f"count must be >= 0, got {self.count}")
        if min(self.keep_first, self.keep_last, self.max_batches - 1, self.gate_steps - 1) < 0:
            raise self.bad_option("keep_first/keep_last must be >= 0, "
                                "max_batches/gate_steps >= 1")

    def removal_count(self, blocks: int) -> int:
        if self.count is not None:
            if self.count >= blocks:
                raise PreconditionError(f"count={self.count} must be less than the number of blocks ({blocks})",
                                        self.name)
            return self.count
        ratio = DEFAULT_RATIO if self.ratio is None else self.ratio
        return min(int(round(ratio * blocks)), blocks - 1)

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        stack = ctx.analyses.get(graph, MainBlockStack)
        if stack is None:
            return PassResult(graph, modified=False, stats={"blocks": 0, "removed": [],
                                                            "reason": no_blocks_reason(graph)})
        count = self.removal_count(len(stack))
        if count == 0:
            return PassResult(graph, modified=False, stats={"blocks": len(stack), "removed": [],
                                                            "reason": "ratio/count gives 0 blocks to remove"})
        scores = block_scores(graph, stack, self.metric, ctx, count=count, max_batches=self.max_batches,
                              gate_steps=self.gate_steps)
        positions = choose_removals(scores, count, self.keep_first, self.keep_last)
        new = without_blocks(graph, stack, positions)
        return PassResult(new, modified=True, stats={
            "metric": self.metric, "blocks": len(stack), "kept": len(stack) - count,
            "removed": [stack.blocks[p].path for p in positions],
            "scores": {b.path: round(s, 6) for b, s in zip(stack.blocks, scores)}})
