"""prune-obs: linear weights -> the same weights with the least salient ones (or groups of 4) set to zero.

The Optimal BERT Surgeon (oBERT, Kurtic et al. 2022).  Each chosen linear
weight is scored with a second-order model of the task loss and the
``sparsity`` fraction with the lowest scores is removed, uniformly per layer:

- ``score=obs`` with ``hessian=fisher``: the dampened empirical Fisher
  ``lam I + (1/m) sum g g^T`` of the layer, block-diagonal with
  ``fisher_block`` x ``fisher_block`` blocks, from ``num_grads`` gradients of
  the task loss (`PassContext.task_loss`, one per calibration batch); score
  ``w^2 / (2 [F^-1]_ii)``, or ``1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q`` for a group.
  ``damp`` is relative: ``lam = damp * mean(g^2)`` of the layer (default
  0.15; a tiny absolute lam makes the scores no better than magnitude).
  ``update=true`` adds the OBS correction of the remaining weights.
- ``score=obs`` with ``hessian=layerwise`` (SparseGPT): no gradients; the
  Hessian ``2 X^T X / n + damp * mean(diag) I`` of each layer's output
  error from its recorded inputs (default damp 0.01); ``update=true``
  spreads each removed weight's error over the row's remaining weights.
  ``hessian=auto`` picks the Fisher unless its blocks would take more than
  ``fisher_budget_gb``.
- ``score=fisher-diag`` (w^2 * (lam + mean g^2), the dampened Fisher's
  diagonal, same relative ``damp``) and ``score=magnitude`` (w^2):
  the baselines.

``block``: ``1`` single weights, ``4x1`` four consecutive output rows of
one input column, ``1x4`` four consecutive input columns of one row.
``layers``: globs of module paths (``*.mlp.*``); default every linear in the
main residual block stack.  ``schedule=gradual`` prunes in ``steps`` steps
to the cubic schedule ``s_t = s (1 - (1 - t / steps)^3)``, each followed by
``distill_steps`` of the distill pass against ``ctx.teacher``.

The pruned weights are new tensors in a copy of the graph, and their keep
masks go into ``Graph.masks`` (training passes keep the zeros at zero).
"""
from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch.fx import Node

from fxpress.analysis.blocks import BlockStack, no_blocks_reason
from fxpress.analysis.manager import MainBlockStack
from fxpress.analysis.recorder import ValueRecorder
from fxpress.errors import PostconditionError, PreconditionError
from fxpress.ir.graph import Graph
from fxpress.ops.quant import QUANTIZED_OPS
from fxpress.passes.depth.distill import Distill, clone_for_training
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.losses import looks_like_lm
from fxpress.passes.infra.registry import register_pass
from fxpress.passes.sparsity import obs_math
from fxpress.passes.sparsity.obs_math import FisherSums, HessianSums, flatten_blocks, unflatten_blocks

log = logging.getLogger(__name__)
aten = torch.ops.aten

Block = Literal["1", "4x1", "1x4"]
Score = Literal["obs", "fisher-diag", "magnitude"]
Hessian = Literal["auto", "fisher", "layerwise"]
Schedule = Literal["oneshot", "gradual"]
DEFAULT_DAMP = {"fisher": 0.15, "layerwise": 0.01}


@dataclass(frozen=True)
class Layer:
    """One prunable weight: its attribute paths (a tied weight has several), the linear nodes reading it
    and the nodes feeding them."""

    paths: tuple[str, ...]
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    shape: tuple[int, int]

    @property
    def path(self) -> str:
        return self.paths[0]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def _linear_weight(node: Node) -> str | None:
    """The attribute path of a linear's weight when it is read directly (a get_attr node)."""
    if node.op != "call_function" or node.target != aten.linear.default or len(node.args) < 2:
        return None
    weight = node.args[1]
    return str(weight.target) if isinstance(weight, Node) and weight.op == "get_attr" else None


def find_layers(graph: Graph, stack: BlockStack | None, globs: tuple[str, ...]) -> list[Layer]:
    """Linears whose module path matches one of `globs`, or (no globs) every linear in `stack`'s blocks."""
    in_blocks = {name for block in stack.blocks for name in block.nodes} if stack is not None else set()
    found: dict[int, dict[str, Any]] = {}
    for node in graph.fx.nodes:
        path = _linear_weight(node)
        if path is None:
            continue
        module = path.rpartition(".")[0]
        wanted = any(fnmatch.fnmatchcase(module, g) for g in globs) if globs else node.name in in_blocks
        tensor = graph.attribute(path)
        if not wanted or tensor.dim() != 2 or not tensor.is_floating_point():
            continue
        entry = found.setdefault(id(tensor), {"paths": [], "nodes": [], "inputs": [], "shape": tuple(tensor.shape)})
        for key, value in (("paths", path), ("nodes", node.name), ("inputs", node.args[0].name)):
            if value not in entry[key]:
                entry[key].append(value)
    return [Layer(tuple(e["paths"]), tuple(e["nodes"]), tuple(e["inputs"]), e["shape"]) for e in found.values()]


def cubic_sparsity(final: float, step: int, steps: int) -> float:
    """oBERT's gradual schedule: s_t = s (1 - (1 - t / steps)^3), reaching s at t = steps."""
    return final * (1 - (1 - step / steps) ** 3)


def _replace_weight(graph: Graph, layer: Layer, weight: torch.Tensor, keep: torch.Tensor) -> None:
    """Put a new tensor (one for all tied paths) at the layer's paths of `graph`, and record its mask."""
    original = graph.attribute(layer.path)
    value = torch.nn.Parameter(weight, requires_grad=original.requires_grad) \
        if isinstance(original, torch.nn.Parameter) else weight
    for path in layer.paths:
        owner, _, leaf = path.rpartition(".")
        holder = graph.module.get_submodule(owner) if owner else graph.module
        is_buffer = leaf in holder._buffers
        delattr(holder, leaf)
        if isinstance(value, torch.nn.Parameter):
            holder.register_parameter(leaf, value)
        elif is_buffer:
            holder.register_buffer(leaf, value)
        else:
            setattr(holder, leaf, value)
        graph.masks[path] = keep


@register_pass
@dataclass(frozen=True)
class PruneObs(Pass):
    """W -> W * mask, dropping the sparsity fraction of weights with the least second-order (OBS) saliency."""

    name: ClassVar[str] = "prune-obs"
    preserves_semantics: ClassVar[bool] = False
    sparsity: float = 0.5  # fraction of each chosen layer's weights set to zero, in [0, 1)
    block: Block = "1"  # pruning group: single weights, 4 output rows x 1 column, or 1 row x 4 columns
    fisher_block: int = 16  # side of the Fisher's diagonal blocks; a multiple of the group size
    num_grads: int = 64  # calibration batches read: one gradient each (or the layer-wise inputs)
    damp: float | None = None  # relative damping; default 0.15 (Fisher, x mean g^2), 0.01 (layerwise, x mean diag H)
    score: Score = "obs"
    hessian: Hessian = "auto"  # the second-order model of score=obs
    schedule: Schedule = "oneshot"
    steps: int = 4  # pruning steps of the gradual schedule
    distill_steps: int = 20  # distill steps after each gradual step (needs ctx.teacher)
    update: bool = False  # apply the OBS update to the weights that stay
    layers: tuple[str, ...] = ()  # globs of module paths; default every linear in the residual blocks
    fisher_budget_gb: float = 4.0  # hessian=auto takes the layer-wise form when the Fisher blocks need more

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise self.bad_option(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.block not in obs_math.GROUP_SIZES:
            raise self.bad_option(f"block must be one of {', '.join(obs_math.GROUP_SIZES)}, got {self.block!r}")
        q = obs_math.group_size(self.block)
        if self.fisher_block < 1 or self.fisher_block % q:
            raise self.bad_option(f"fisher_block={self.fisher_block} must be a positive multiple of the "
                                  f"{q} weights of block={self.block}; use {max(q, 16)}")
        if self.num_grads < 1 or self.steps < 1 or self.distill_steps < 0:
            raise self.bad_option("num_grads and steps must be >= 1, distill_steps >= 0")
        if (self.damp is not None and self.damp <= 0) or self.fisher_budget_gb <= 0:
            raise self.bad_option("damp and fisher_budget_gb must be > 0")

    # -- preconditions ------------------------------------------------------------
    def needs_data(self) -> bool:
        return self.score != "magnitude" or (self.schedule == "gradual" and self.distill_steps > 0)

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if self.sparsity == 0:
            return
        if self.needs_data():
            ctx.require_calibration(self.name)
        if self.schedule == "gradual" and self.distill_steps:
            ctx.require_teacher(self.name)

    def method(self, layers: list[Layer]) -> str:
        """How weights are scored: fisher, layerwise, fisher-diag or magnitude (hessian=auto resolved)."""
        if self.score != "obs":
            return self.score
        if self.hessian != "auto":
            return self.hessian
        need = sum(layer.numel for layer in layers) * (self.fisher_block + obs_math.GRADIENT_BUFFER) * 4
        chosen = "fisher" if need <= self.fisher_budget_gb * 2 ** 30 else "layerwise"
        log.info("prune-obs: the Fisher blocks need %.2f GiB (budget %.2f): hessian=%s",
                 need / 2 ** 30, self.fisher_budget_gb, chosen)
        return chosen

    def check_layers(self, layers: list[Layer], method: str) -> None:
        for layer in layers:
            where = f"{layer.path} (node {layer.nodes[0]}, weight {list(layer.shape)})"
            reason = obs_math.block_mismatch(layer.shape, self.block)
            if reason:
                raise PreconditionError(f"{reason}: {where}; use block=1, or leave the layer out with "
                                        "layers=...", self.name)
            if method == "fisher" and layer.numel % self.fisher_block:
                raise PreconditionError(f"fisher_block={self.fisher_block} does not divide the {layer.numel} "
                                        f"weights of {where}; choose a fisher_block that divides it (and is a "
                                        "multiple of the block size) or hessian=layerwise", self.name)

    def ensures(self, graph: Graph) -> None:
        for path, keep in graph.masks.items():
            if bool((graph.attribute(path).detach()[~keep] != 0).any()):
                raise PostconditionError(f"weights of {path} outside its mask are not zero", self.name)

    # -- the pass -----------------------------------------------------------------
    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.sparsity == 0:
            return PassResult(graph, modified=False, stats={"sparsity": 0.0, "reason": "sparsity=0: nothing to prune"})
        self.requires(graph, ctx)
        stack = ctx.analyses.get(graph, MainBlockStack)
        layers = find_layers(graph, stack, self.layers)
        if not layers and self.layers:
            raise PreconditionError(f"layers={';'.join(self.layers)} matches no linear weight of {graph.name}; "
                                    "the globs match module paths such as model.encoder.layer.0.output.dense",
                                    self.name)
        quantized = [node for node in graph.fx.nodes if node.target in QUANTIZED_OPS]
        if not layers and quantized:
            raise PreconditionError(f"no float linear weight left to prune: {len(quantized)} layers are quantized "
                                    f"({quantized[0].format_node()}); prune before quantize", self.name)
        if not layers:
            reason = no_blocks_reason(graph) if stack is None else "its residual blocks hold no linear weights"
            return PassResult(graph, modified=False, stats={"sparsity": 0.0, "reason": f"{reason}; name the layers "
                                                            "to prune with layers=..."})
        method = self.method(layers)
        self.check_layers(layers, method)
        started = time.perf_counter()
        if self.schedule == "oneshot":
            pruned, history = self.prune_step(graph, layers, method, self.sparsity, ctx), []
        else:
            pruned, history = self._gradual(graph, layers, method, stack, ctx)
        stats = self._stats(pruned, layers, method, history)
        stats["seconds"] = round(time.perf_counter() - started, 2)
        return PassResult(pruned, modified=True, stats=stats, preserved=(MainBlockStack,))

    def _gradual(self, graph: Graph, layers: list[Layer], method: str, stack: BlockStack | None,
                 ctx: PassContext) -> tuple[Graph, list[dict]]:
        current, history = graph, []
        distill = Distill(steps=self.distill_steps, tail=2 if stack is not None else 0)
        for step in range(1, self.steps + 1):
            target = cubic_sparsity(self.sparsity, step, self.steps)
            current = self.prune_step(current, layers, method, target, ctx)
            record: dict[str, Any] = {"step": step, "sparsity": round(target, 4)}
            if self.distill_steps:
                result = distill(current, ctx)
                current = result.graph
                record["distill_loss"] = result.stats["loss_last"]
            history.append(record)
            log.info("prune-obs: gradual step %d/%d at sparsity %.3f", step, self.steps, target)
        return current, history

    def prune_step(self, graph: Graph, layers: list[Layer], method: str, sparsity: float,
                   ctx: PassContext) -> Graph:
        """A copy of `graph` with each layer pruned to `sparsity` (weights pruned before stay pruned)."""
        batches = ctx.require_calibration(self.name)[: self.num_grads] if method != "magnitude" else []
        if method in ("fisher", "fisher-diag"):
            data: list[Any] = self._gradients(graph, layers, batches, ctx, full=method == "fisher")
        elif method == "layerwise":
            data = self._hessians(graph, layers, batches, ctx)
        else:
            data = [None] * len(layers)
        new = graph.copy()
        for layer, layer_data in ctx.progress.track(list(zip(layers, data)), "prune-obs: pruning layers",
                                                    total=len(layers)):
            weight = graph.attribute(layer.path).detach()
            before = graph.masks.get(layer.path)
            pruned = None if before is None else ~before
            weight, keep = self._prune_layer(weight, method, layer_data, sparsity, pruned)
            _replace_weight(new, layer, weight, keep)
        return new

    def _prune_layer(self, weight: torch.Tensor, method: str, data: Any, sparsity: float,
                     pruned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if method == "layerwise":
            damp = self.damp if self.damp is not None else DEFAULT_DAMP["layerwise"]
            return obs_math.layerwise_prune(weight, data.hessian(damp), sparsity, self.block, update=self.update,
                                            pruned=pruned)
        q, shape = obs_math.group_size(self.block), tuple(weight.shape)
        flat = flatten_blocks(weight, self.block)
        finv = None
        if method == "fisher":
            finv = data.inverse(self.damp if self.damp is not None else DEFAULT_DAMP["fisher"])
            scores = obs_math.obs_scores(flat, finv, q)
        elif method == "fisher-diag":
            damp = self.damp if self.damp is not None else DEFAULT_DAMP["fisher"]
            scores = obs_math.diagonal_fisher_scores(flat, data.mean_squares(), q, data.damping(damp))
        else:
            scores = obs_math.magnitude_scores(flat, q)
        groups_pruned = None if pruned is None else flatten_blocks(pruned, self.block).view(-1, q).any(1)
        keep = obs_math.expand_groups(obs_math.select_keep(scores, sparsity, groups_pruned), q)
        new = obs_math.obs_update(flat, finv, keep, q) if finv is not None and self.update else flat * keep
        return unflatten_blocks(new, shape, self.block), unflatten_blocks(keep, shape, self.block)

    # -- statistics from calibration data ------------------------------------------
    def _gradients(self, graph: Graph, layers: list[Layer], batches: list[tuple], ctx: PassContext,
                   full: bool) -> list[FisherSums]:
        """Fisher sums of each layer from one task-loss gradient per batch, on trainable clones in a copy."""
        student = graph.copy()
        clone_for_training(student, [p for layer in layers for p in layer.paths])
        tensors = [student.attribute(layer.path) for layer in layers]
        sums = [FisherSums(layer.numel, self.fisher_block if full else 1, full) for layer in layers]
        for index, batch in enumerate(ctx.progress.track(batches, "prune-obs: gradients", total=len(batches))):
            with torch.enable_grad():
                output = student.module(*batch)
                if index == 0:
                    self._check_task_loss(output, batch, ctx)
                grads = torch.autograd.grad(ctx.task_loss(output, batch), tensors)
            for layer_sums, grad in zip(sums, grads):
                layer_sums.add(flatten_blocks(grad, self.block))
        return sums

    def _check_task_loss(self, output: Any, batch: tuple, ctx: PassContext) -> None:
        if ctx.loss is None and not looks_like_lm(batch, output):
            raise PreconditionError(
                f"score={self.score} needs gradients of a task loss, and the output is not causal-LM logits: the "
                "default loss (error against the model's own output) has zero gradient.  Set "
                "PassContext(loss=...) (e.g. fxpress.training.losses.contrastive_loss for an encoder on paired "
                "batches), or use score=magnitude or hessian=layerwise", self.name)

    def _hessians(self, graph: Graph, layers: list[Layer], batches: list[tuple],
                  ctx: PassContext) -> list[HessianSums]:
        """X^T X of the inputs of each layer's linears, recorded on the batches (tied: summed over uses)."""
        per_input: dict[str, HessianSums] = {}

        def observe(node: Node, value: Any) -> None:
            if node.name not in per_input:
                per_input[node.name] = HessianSums(value.shape[-1])
            per_input[node.name].add(value)

        recorder = ValueRecorder(graph, sorted({n for layer in layers for n in layer.inputs}))
        recorder.add_observer(observe)
        for batch in ctx.progress.track(batches, "prune-obs: layer inputs", total=len(batches)):
            recorder.run_batch(batch)
        result = []
        for layer in layers:
            total = HessianSums(layer.shape[1])
            for name in layer.inputs:
                total.xtx += per_input[name].xtx
                total.rows += per_input[name].rows
            result.append(total)
        return result

    def _stats(self, graph: Graph, layers: list[Layer], method: str, history: list[dict]) -> dict[str, Any]:
        per_layer, total, nonzero = {}, 0, 0
        for layer in layers:
            count = int(graph.masks[layer.path].sum())
            per_layer[layer.path] = {"sparsity": round(1 - count / layer.numel, 4), "nnz": count}
            total, nonzero = total + layer.numel, nonzero + count
        stats: dict[str, Any] = {
            "method": method, "block": self.block, "schedule": self.schedule, "layers": len(layers),
            "sparsity": round(1 - nonzero / total, 4), "nnz": nonzero, "pruned": total - nonzero,
            "per_layer": per_layer}
        if history:
            stats["steps"] = history
        return stats
