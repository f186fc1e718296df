"""dead-code elimination: a node whose result nobody uses -> removed.

Impure ops (in-place writes, random number generation) are kept; so are
placeholders.  Attributes no longer read by any node are deleted too, so
the params figure drops with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fxpress.ir.graph import Graph
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """unused(x) -> removed; unread parameters and buffers -> deleted."""

    name: ClassVar[str] = "dce"
    preserves_semantics: ClassVar[bool] = True

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not _has_dead_nodes(graph) and not graph.unused_attributes():
            return PassResult(graph, modified=False, stats={"removed_nodes": 0, "removed_attributes": 0,
                                                                "reason": "no dead node and no unread tensor"})
        new = graph.copy()
        before = new.num_nodes
        new.fx.eliminate_dead_code()
        removed_attrs = new.remove_unused_attributes()
        new.recompile()
        return PassResult(new, modified=True,
                          stats={"removed_nodes": before - new.num_nodes, "removed_attributes": len(removed_attrs)})


def _has_dead_nodes(graph: Graph) -> bool:
    return any(not node.users and node.op not in ("placeholder", "output") and not node.is_impure()
               for node in graph.fx.nodes)
