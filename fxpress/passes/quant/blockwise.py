"""Block-wise reconstruction: a quantized graph's residual blocks trained one at a time to reproduce the
float graph's block outputs (EfficientQAT's Block-AP; OmniQuant and BRECQ do the same per block).

Block p of the student takes the output of the student's blocks before it (quantized and already
trained), so it learns to undo their error, and is trained to give what the float block p gives on the
float stream.  The loss is the squared error per token relative to the float output's square
(`token_nmse`): residual streams of decoders carry a few tokens whose values are hundreds of times
larger than the rest (the "massive activations" of the first token), and a plain mean squared error
would train every block after the one that makes them on those tokens alone.

Only one block runs per step, on recorded values: the graph's values outside the blocks (embeddings,
rotary tables, masks) are recorded once per calibration batch by `BlockRunner`, and each block's input
is carried from block to block, so the cost is a few forward and backward passes of one block, not of
the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
from torch import Tensor

from fxpress.analysis.blocks import Block, BlockRunner, BlockStack
from fxpress.ir.graph import Graph
from fxpress.passes.infra.losses import cosine_decay


def token_nmse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over tokens of ||s - t||^2 / ||t||^2 on the last dimension."""
    error = (student.float() - teacher.float()).pow(2).sum(-1)
    return (error / teacher.float().pow(2).sum(-1).clamp_min(1e-12)).mean()


class BlockForward(torch.fx.Interpreter):
    """Runs one block's nodes of a graph: its input given, the values it reads from outside the blocks
    taken from a recorded run, its weights from the module unless `overrides` (attribute path -> tensor)
    replaces them."""

    def __init__(self, graph: Graph, block: Block):
        super().__init__(graph.module, garbage_collect_values=False)
        nodes = {n.name: n for n in graph.fx.nodes}
        self.nodes = [nodes[name] for name in block.nodes]
        self.entry, self.exit = nodes[block.input], nodes[block.output]
        inside = set(self.nodes)
        self.outside = list(dict.fromkeys(i for n in self.nodes for i in n.all_input_nodes if i not in inside))
        self.overrides: dict[str, Tensor] = {}

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self.overrides[target] if target in self.overrides else super().get_attr(target, args, kwargs)

    def needs(self) -> list[str]:
        """Names of the recorded values the block reads (besides its input and attributes)."""
        return [n.name for n in self.outside if n is not self.entry and n.op != "get_attr"]

    def __call__(self, x: Tensor, recorded: dict[str, Any], overrides: dict[str, Tensor] | None = None) -> Tensor:
        self.overrides = overrides or {}
        self.env = {}
        for node in self.outside:
            self.env[node] = x if node is self.entry else self.run_node(node) if node.op == "get_attr" else \
                recorded[node.name]
        for node in self.nodes:
            self.env[node] = self.run_node(node)
        out = self.env[self.exit]
        self.env = {}
        return out


@dataclass
class Recorded:
    """Per calibration batch: the values outside the blocks that blocks read, and block 0's input."""

    outside: list[dict[str, Any]]
    first_inputs: list[Tensor]


def record(graph: Graph, stack: BlockStack, batches: list[tuple]) -> Recorded:
    """One run of the float graph per batch, keeping what the blocks read from outside them."""
    wanted = {name for block in stack.blocks for name in BlockForward(graph, block).needs()}
    outside, first = [], []
    with torch.no_grad():
        for batch in batches:
            runner = BlockRunner(graph, stack, record=True)
            runner(*batch)
            values = {node.name: value for node, value in runner.skeleton.items() if node.name in wanted}
            missing = wanted - set(values)
            if missing:
                raise ValueError(f"the blocks read {sorted(missing)[0]}, which a recorded run does not keep")
            outside.append(values)
            first.append(runner.inputs[0])
    return Recorded(outside, first)


ParamGroups = list[tuple[list[torch.nn.Parameter], float]]


def reconstruct(student: Graph, teacher: Graph, stack: BlockStack, batches: list[tuple],
                params_of: Callable[[Block], ParamGroups], overrides: Callable[[Block], dict[str, Tensor]],
                epochs: int, progress: Any, label: str, generator: torch.Generator | None = None,
                step_hook: Callable[[], None] = lambda: None) -> list[dict[str, float]]:
    """Train the student's blocks one after another; returns per block its loss before and after.

    ``params_of(block)``: the block's parameter groups ``(params, lr)``; ``overrides(block)``: the
    attribute values its forward uses (the quantized weights, rebuilt on every call).  Each epoch visits
    every batch once, in an order drawn from `generator`."""
    recorded = record(teacher, stack, batches)
    student_x = list(recorded.first_inputs)
    teacher_x = list(recorded.first_inputs)
    report = []
    for block in progress.track(stack.blocks, label, total=len(stack.blocks)):
        run_teacher, run_student = BlockForward(teacher, block), BlockForward(student, block)
        with torch.no_grad():
            targets = [run_teacher(x, rec) for x, rec in zip(teacher_x, recorded.outside)]
        groups = params_of(block)

        def loss_on(index: int) -> Tensor:
            return token_nmse(run_student(student_x[index], recorded.outside[index], overrides(block)),
                              targets[index])

        with torch.no_grad():
            before = sum(float(loss_on(i)) for i in range(len(batches))) / len(batches)
        if epochs:
            _train_block(groups, loss_on, len(batches), epochs, generator, step_hook)
        with torch.no_grad():
            student_x = [run_student(x, rec, overrides(block)) for x, rec in zip(student_x, recorded.outside)]
            after = sum(float(token_nmse(y, t)) for y, t in zip(student_x, targets)) / len(batches)
        teacher_x = targets
        report.append({"block": block.path, "loss_before": round(before, 6), "loss_after": round(after, 6)})
    return report


def _train_block(groups: ParamGroups, loss_on: Callable[[int], Tensor], count: int, epochs: int,
                 generator: torch.Generator | None, step_hook: Callable[[], None]) -> None:
    groups = [(params, lr) for params, lr in groups if params]
    if not groups:
        return
    trained = [p for params, _ in groups for p in params]
    optimizer = torch.optim.Adam([{"params": params, "lr": lr} for params, lr in groups])
    schedule = cosine_decay(optimizer, epochs * count)
    for _ in range(epochs):
        for index in torch.randperm(count, generator=generator).tolist():
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_on(index)
                grads = torch.autograd.grad(loss, trained, allow_unused=True)
            for param, grad in zip(trained, grads):
                param.grad = grad
            optimizer.step()
            schedule.step()
            step_hook()
