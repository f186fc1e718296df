"""A value recorder: run a graph and hand the values of chosen nodes to observers.

    recorder = ValueRecorder(graph, select=lambda node: node.target == aten.linear.default)
    recorder.add_observer(lambda node, value: stats[node.name].append(value.abs().amax()))
    for batch in ctx.batches(graph):
        recorder.run_batch(batch)
    recorder.values   # with keep=True, the last run's values by node name

What quantization observers (ranges, histograms) and pruning statistics
(activation norms per channel) read.  Observers see values during the run,
so nothing but what they keep stays in memory; `keep=True` stores the
selected values of the last run.  Block boundaries have their own runner,
`fxpress.analysis.blocks.BlockRunner`, which can also skip and transform
blocks.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch.fx import Node

from fxpress.ir.graph import Graph

Observer = Callable[[Node, Any], None]


class ValueRecorder(torch.fx.Interpreter):
    """Runs `graph` (no grad) and reports the values of the nodes `select` accepts (default: all ops)."""

    def __init__(self, graph: Graph, select: Callable[[Node], bool] | Iterable[str] | None = None, *,
                 keep: bool = False):
        super().__init__(graph.module)
        self.graph_ = graph
        if select is None:
            self._select: Callable[[Node], bool] = lambda node: node.op not in ("placeholder", "output")
        elif callable(select):
            self._select = select
        else:
            names = set(select)
            unknown = names - {n.name for n in graph.fx.nodes}
            if unknown:
                raise KeyError(f"{graph.name} has no node named {sorted(unknown)[0]!r}")
            self._select = lambda node: node.name in names
        self.keep = keep
        self.observers: list[Observer] = []
        self.values: dict[str, Any] = {}

    def add_observer(self, observer: Observer) -> ValueRecorder:
        self.observers.append(observer)
        return self

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        if self._select(n):
            for observer in self.observers:
                observer(n, value)
            if self.keep:
                self.values[n.name] = value
        return value

    def run_batch(self, batch: tuple) -> Any:
        """Run once on a batch shaped like the graph's example inputs; return the graph's output."""
        flat, _ = torch.utils._pytree.tree_flatten(list(batch))
        if self.keep:
            self.values = {}
        with torch.no_grad():
            return self.run(*flat)


def record_values(graph: Graph, batch: tuple, names: Iterable[str]) -> dict[str, Any]:
    """The values of the named nodes on one batch."""
    recorder = ValueRecorder(graph, list(names), keep=True)
    recorder.run_batch(batch)
    return recorder.values
