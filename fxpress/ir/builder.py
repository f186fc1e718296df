"""Create nodes with provenance: every node a pass inserts carries the origin of an anchor node.

    build = Builder(graph, "merge-tokens")
    with build.before(block.attn_residual.next, like=block.attn_residual) as at:
        merged = at.call(MERGE_TOKENS, x, metric, None, 8, "bipartite", True, 3, 0.1)
        count = at.call(aten.sym_size.int, merged, 1)

A created node gets the anchor's module stack (`nn_module_stack`), stack
trace and source function, so module paths, block discovery and dumps see it
where its anchor was, and `meta["fxpress_origin"]` naming the pass that made
it and the anchor.  torch.export's shape metadata (`val`, `tensor_meta`) is
never copied: it would describe the anchor, not the new node.  Capture marks
every node it creates with origin "capture", so `verify` can require that
every `call_function` node has an origin (provenance by construction).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch.fx
from torch.fx import Node

from fxpress.ir.graph import Graph

ORIGIN_KEY = "fxpress_origin"
PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn", "from_node")
STALE_KEYS = ("val", "tensor_meta", "example_value", "unbacked_bindings")


def origin(node: Node) -> dict[str, str] | None:
    """{"pass": ..., "anchor": ...} of a node, or None when nothing recorded where it came from."""
    return node.meta.get(ORIGIN_KEY)


def mark_captured(graph: torch.fx.Graph) -> None:
    """Record that every node of a freshly captured graph came from capture."""
    for node in graph.nodes:
        node.meta.setdefault(ORIGIN_KEY, {"pass": "capture", "anchor": node.name})


def copy_provenance(node: Node, like: Node, pass_name: str) -> Node:
    """Give `node` the origin of `like` (module stack, stack trace) and name `pass_name` as its maker."""
    for key in PROVENANCE_KEYS:
        if key in like.meta:
            value = like.meta[key]
            node.meta[key] = dict(value) if isinstance(value, dict) else value
    for key in STALE_KEYS:
        node.meta.pop(key, None)
    node.meta[ORIGIN_KEY] = {"pass": pass_name, "anchor": like.name}
    return node


class Inserter:
    """Creates nodes at one insertion point, each with the provenance of `like`."""

    def __init__(self, graph: Graph, like: Node, pass_name: str):
        self.graph, self.like, self.pass_name = graph, like, pass_name

    def call(self, target: Any, *args: Any, name: str | None = None, **kwargs: Any) -> Node:
        """A call_function node `target(*args, **kwargs)`."""
        node = self.graph.fx.call_function(target, tuple(args), dict(kwargs) or None, name=name)
        return copy_provenance(node, self.like, self.pass_name)

    def get_attr(self, path: str) -> Node:
        """A get_attr node reading the tensor at attribute `path`."""
        return copy_provenance(self.graph.fx.get_attr(path), self.like, self.pass_name)

    def call_module(self, path: str, *args: Any) -> Node:
        return copy_provenance(self.graph.fx.call_module(path, tuple(args)), self.like, self.pass_name)


class Builder:
    """The one way passes create nodes (see the module doc)."""

    def __init__(self, graph: Graph, pass_name: str):
        self.graph, self.pass_name = graph, pass_name

    @contextmanager
    def before(self, point: Node, like: Node | None = None) -> Iterator[Inserter]:
        """Insert before `point`; provenance from `like` (default: `point`)."""
        with self.graph.fx.inserting_before(point):
            yield Inserter(self.graph, point if like is None else like, self.pass_name)

    @contextmanager
    def after(self, point: Node, like: Node | None = None) -> Iterator[Inserter]:
        """Insert after `point`, in call order; provenance from `like` (default: `point`)."""
        with self.graph.fx.inserting_before(point.next):
            yield Inserter(self.graph, point if like is None else like, self.pass_name)

    def call_before(self, point: Node, target: Any, *args: Any, like: Node | None = None, **kwargs: Any) -> Node:
        """One node before `point` (shorthand for a `before` block with one call)."""
        with self.before(point, like) as at:
            return at.call(target, *args, **kwargs)
