"""distill: graph weights -> weights trained to match the teacher (ctx.teacher) on calibration batches.

Recovery after depth compression.  The loss on each calibration batch is

    KD(student output, teacher output) + hidden_weight * mean_k NMSE(h_s[-k], h_t[-k])

- KD is the KL divergence of the teacher's next-token distribution from
  the student's for causal-LM logits (Minitron's logit distillation), else
  the squared error relative to the teacher's output;
- with ``tail=K > 0`` the outputs of the student's last K residual blocks
  are matched to those of the teacher's last K blocks (FoldGPT's
  tail-layer distillation); ``tail=0`` is plain logit KD.

Trained: every tensor the residual blocks read (shared tensors stay shared:
they are one tensor, trained once) and the 1-D tensors outside the blocks
(the final norm); embeddings and heads stay frozen and shared with the
input graph.  Sparsity masks a pruning pass left on the graph
(`Graph.masks`) are re-applied after every step, so pruned weights stay
zero.  ``task_weight > 0`` adds the task loss (`PassContext.task_loss`: an
encoder's contrastive retrieval loss on paired batches, next-token
cross-entropy for LMs) to the distillation loss.  Trained tensors are fresh clones: the input graph and the
user's model are never written.  AdamW, ``steps`` steps cycling through the
batches, ``batch`` batches a step (the mean of their losses), with a progress
bar from ``ctx.progress``.

Across processes (torchrun, `fxpress.utils.distributed`) the ``batch`` batches
of a step are split over the processes (``batch`` is global: the result does not
depend on the number of processes).  The student trains as an FSDP2
(``fully_shard``) copy: gradients are reduce-scattered, AdamW state is sharded,
and the trained tensors are gathered back, so every process takes the same steps
and holds the same student.  Give ``batch`` a multiple of the process count, or
some processes run a batch with weight 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph
from fxpress.analysis.blocks import BlockRunner, BlockStack, comparable, find_blocks, no_blocks_reason
from fxpress.analysis.manager import MainBlockStack
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass
from fxpress.passes.infra.losses import looks_like_lm
from fxpress.utils import distributed

log = logging.getLogger(__name__)


def output_kd(student: torch.Tensor, teacher: torch.Tensor, batch: tuple) -> torch.Tensor:
    """KL(teacher || student) per token for LM logits; else squared error relative to the teacher."""
    if looks_like_lm(batch, teacher):
        vocab = teacher.shape[-1]
        return F.kl_div(F.log_softmax(student.reshape(-1, vocab).float(), -1),
                        F.log_softmax(teacher.reshape(-1, vocab).float(), -1), log_target=True,
                        reduction="batchmean")
    return normalized_mse(student, teacher)


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return ((student - teacher) ** 2).mean() / (teacher ** 2).mean().clamp_min(1e-12)


def _teacher_blocks(teacher: Any, prefix: str) -> list[torch.nn.Module]:
    container = teacher.get_submodule(prefix) if prefix else teacher
    children = sorted(((int(n), m) for n, m in container.named_children() if n.isdigit()), key=lambda x: x[0])
    return [m for _, m in children]


def teacher_targets(teacher: Any, batch: tuple, prefix: str, tail: int) -> tuple[torch.Tensor, list]:
    """The teacher's output on `batch` and the outputs of its last `tail` blocks (a Graph or nn.Module)."""
    with torch.no_grad():
        if isinstance(teacher, Graph):
            stack = find_blocks(teacher) if tail else None
            if stack is None:
                return teacher(*batch), []
            runner = BlockRunner(teacher, stack, record=True)
            output = runner(*batch)
            return output, [runner.outputs[p] for p in range(len(stack))][-tail:]
        hidden: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: hidden.append(out[0] if isinstance(out, tuple) else out))
                 for m in (_teacher_blocks(teacher, prefix) if tail else [])]
        try:
            output = teacher(*batch)
        finally:
            for hook in hooks:
                hook.remove()
        return output, hidden[-tail:] if tail else []


def trainable_paths(graph: Graph, stack: BlockStack | None) -> list[str]:
    """Attribute paths to train: what the blocks read, and 1-D float tensors outside them."""
    in_blocks = {p for b in stack.blocks for p in b.params} if stack is not None else set()
    paths = []
    for path, tensor in graph.referenced_tensors().items():
        if tensor.is_floating_point() and (path in in_blocks or tensor.dim() == 1) and \
                isinstance(tensor, torch.nn.Parameter):
            paths.append(path)
    return paths


def clone_for_training(graph: Graph, paths: list[str]) -> list[torch.nn.Parameter]:
    """Put fresh trainable clones at `paths` in `graph` (a copy); a tensor held twice gets one clone."""
    clones: dict[int, torch.nn.Parameter] = {}
    for path in paths:
        tensor = graph.attribute(path)
        if id(tensor) not in clones:
            clones[id(tensor)] = torch.nn.Parameter(tensor.detach().clone(), requires_grad=True)
        owner, _, leaf = path.rpartition(".")
        holder = graph.module.get_submodule(owner) if owner else graph.module
        delattr(holder, leaf)
        holder.register_parameter(leaf, clones[id(tensor)])
    return list(clones.values())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@register_pass
@dataclass(frozen=True)
class Distill(Pass):
    """W -> W - lr * grad(KD(student, teacher) + tail hidden-state loss): the graph learns the teacher's outputs."""

    name: ClassVar[str] = "distill"
    preserves_semantics: ClassVar[bool] = False
    steps: int = 50
    lr: float = 1e-4
    tail: int = 2  # match the last `tail` blocks' hidden states; 0 = logit KD only
    hidden_weight: float = 1.0
    max_batches: int = 8
    task_weight: float = 0.0  # weight of the task loss (ctx.task_loss) added to the distillation loss
    batch: int = 1  # calibration batches per step (split over the processes of a torchrun)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.tail < 0 or self.lr <= 0 or self.max_batches < 1 or self.task_weight < 0 \
                or self.batch < 1:
            raise self.bad_option("steps, tail and task_weight must be >= 0, lr > 0, max_batches and batch >= 1")

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        ctx.require_teacher(self.name)
        ctx.require_calibration(self.name)
        if self.tail and self.steps and ctx.analyses.get(graph, MainBlockStack) is None:
            raise PreconditionError(f"tail={self.tail} needs residual blocks and {graph.name} has none "
                                    f"({no_blocks_reason(graph)}); use tail=0 for logit distillation", self.name)

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        teacher = ctx.require_teacher(self.name)
        batches = ctx.require_calibration(self.name)[: self.max_batches]
        if self.steps == 0:
            return PassResult(graph, modified=False, stats={"steps": 0, "reason": "steps=0: nothing to train"})
        stack = ctx.analyses.get(graph, MainBlockStack)
        student = graph.copy()
        paths = trainable_paths(student, stack)
        params = clone_for_training(student, paths)
        masks = {p: m for p, m in student.masks.items() if p in paths}
        needed = {i for step in range(self.steps) for i in self._my_batches(step, len(batches))} | {0}
        targets = {i: teacher_targets(teacher, batches[i], stack.prefix if stack else "", self.tail)
                   for i in sorted(needed)}  # this process's batches, and batch 0 to pad a short share
        if distributed.world()[1] > 1:
            losses = self._train_sharded(student, stack, paths, masks, batches, targets, ctx)
        else:
            losses = self._train(student, stack, params, masks, batches, targets, ctx)
        window = max(1, min(len(batches), self.steps // 2))  # mean loss over a pass of the batches
        for param in params:
            param.grad = None
        student.annotate()
        return PassResult(student, modified=True, preserved=(MainBlockStack,), stats={
            "steps": self.steps, "tail": self.tail, "trained_params": sum(p.numel() for p in params),
            "masked_params": len(masks),
            "loss_first": round(_mean(losses[:window]), 6), "loss_last": round(_mean(losses[-window:]), 6)})

    def _loss(self, outputs: Any, batch: tuple, target: tuple, ctx: PassContext) -> torch.Tensor:
        """The distillation loss of the student's `outputs` (see `student_outputs`) on `batch`."""
        teacher_out, teacher_hidden = target
        output, hidden = outputs
        loss = output_kd(output, teacher_out, batch)
        if teacher_hidden:
            count = min(len(teacher_hidden), len(hidden))
            matched = sum(normalized_mse(*comparable(s, t)) for s, t in zip(hidden[-count:], teacher_hidden[-count:]))
            loss = loss + self.hidden_weight * (matched / count)
        if self.task_weight:
            loss = loss + self.task_weight * ctx.task_loss(output, batch, teacher_out)
        return loss

    def _my_batches(self, step: int, available: int) -> list[int]:
        """Indices of the calibration batches this process trains on at `step` (its share of the step's)."""
        return distributed.shard([(step * self.batch + i) % available for i in range(self.batch)])

    def _train(self, student: Graph, stack: BlockStack | None, params: list, masks: dict, batches: list,
               targets: dict, ctx: PassContext) -> list[float]:
        """One process: AdamW on `params` with the mean gradient of each step's batches."""
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        masked = [(student.attribute(path), keep) for path, keep in masks.items()]
        losses = []
        for step in ctx.progress.track(range(self.steps), "distill", total=self.steps):
            for param in params:
                param.grad = None
            total = 0.0
            for index in self._my_batches(step, len(batches)):
                with torch.enable_grad():
                    outputs = student_outputs(student, stack, batches[index], bool(targets[index][1]))
                    loss = self._loss(outputs, batches[index], targets[index], ctx) / self.batch
                    grads = torch.autograd.grad(loss, params, allow_unused=True)  # frozen tensors get no .grad
                for param, grad in zip(params, grads):
                    if grad is not None:
                        param.grad = grad if param.grad is None else param.grad + grad
                total += float(loss.detach())
            optimizer.step()
            with torch.no_grad():
                for tensor, keep in masked:
                    tensor.mul_(keep.to(tensor.dtype))
            losses.append(total)
        return losses

    def _train_sharded(self, student: Graph, stack: BlockStack | None, paths: list[str], masks: dict,
                       batches: list, targets: dict, ctx: PassContext) -> list[float]:
        """Several processes: the same AdamW steps on an FSDP2-sharded copy of the student (gradients and
        optimizer state sharded), each process running its share of every step's batches; the trained
        tensors are gathered back into `student` on every process."""
        processes = distributed.world()[1]
        if self.batch % processes:
            log.warning("distill: batch=%d over %d processes: some run a batch with weight 0 each step; give "
                        "batch a multiple of the process count", self.batch, processes)
        slots = -(-self.batch // processes)  # FSDP2 needs the same number of backward passes everywhere
        sharded = distributed.fully_shard_copy(student.module, set(paths))
        view = Graph(sharded, student.example_inputs, name=student.name)
        forward = distributed.sharded_method(sharded, "distill_outputs",
                                             lambda batch, hidden: student_outputs(view, stack, batch, hidden))
        trained = [p for p in sharded.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=self.lr, weight_decay=0.0)
        masked = [(param, distributed.shard_like(keep.to(param.dtype), param))
                  for param, keep in ((sharded.get_parameter(path), keep) for path, keep in masks.items())]
        losses = []
        for step in ctx.progress.track(range(self.steps), "distill", total=self.steps):
            optimizer.zero_grad(set_to_none=True)
            mine = self._my_batches(step, len(batches))
            total = 0.0
            for slot in range(slots):
                index, weight = (mine[slot], 1.0) if slot < len(mine) else (0, 0.0)
                with torch.enable_grad():
                    outputs = forward(batches[index], bool(targets[index][1]))
                    loss = self._loss(outputs, batches[index], targets[index], ctx) / self.batch
                    (loss * weight * processes).backward()  # FSDP2 averages over processes: this sums
                total += weight * float(loss.detach())
            optimizer.step()
            with torch.no_grad():
                for tensor, keep in masked:
                    tensor.mul_(keep)
            losses.append(distributed.sum_floats([total])[0])
        with torch.no_grad():
            for path, value in distributed.gather_parameters(sharded, paths).items():
                student.attribute(path).copy_(value)
        return losses


def student_outputs(student: Graph, stack: BlockStack | None, batch: tuple, hidden: bool) -> tuple[Any, list]:
    """The student's output on `batch` and, with `hidden`, the outputs of all its residual blocks."""
    if not hidden:
        return student.module.forward(*batch), []  # forward, not __call__: FSDP2 hooks wrap the caller
    runner = BlockRunner(student, stack, record=True)
    output = runner(*batch)
    return output, [runner.outputs[p] for p in range(len(stack))]
