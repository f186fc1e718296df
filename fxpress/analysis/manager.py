"""Analyses computed once per graph version and shared through the pass context.

    stack = ctx.analyses.get(graph, BlockStacks)     # computed on first use, then cached

An analysis is a class with a `name` and `run(graph)`.  Results are cached
per Graph object and its `version` (bumped by `annotate()`, so a rewritten
and re-annotated graph is analysed again).  A pass that leaves an analysis
valid declares it in `PassResult(preserved=(BlockStacks,))`, and the manager
carries the result over to the new graph; only analyses whose results name
nodes (`by_name = True`) can be carried, because a pass's new graph is a copy
with new node objects.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, ClassVar, Protocol

from fxpress.analysis.attention import TransformerBlock, find_transformer_blocks
from fxpress.analysis.blocks import BlockStack, find_block_stacks
from fxpress.ir.graph import Graph

log = logging.getLogger(__name__)


class Analysis(Protocol):
    name: ClassVar[str]
    by_name: ClassVar[bool]  # results refer to nodes by name: valid on a copy of the graph

    @staticmethod
    def run(graph: Graph) -> Any: ...


class BlockStacks:
    """Every stack of repeated residual blocks, most MACs first (module paths; see analysis/blocks.py)."""

    name: ClassVar[str] = "block-stacks"
    by_name: ClassVar[bool] = True

    @staticmethod
    def run(graph: Graph) -> list[BlockStack]:
        return find_block_stacks(graph)


class MainBlockStack:
    """The main stack (most MACs), or None."""

    name: ClassVar[str] = "main-block-stack"
    by_name: ClassVar[bool] = True

    @staticmethod
    def run(graph: Graph) -> BlockStack | None:
        stacks = find_block_stacks(graph)
        return stacks[0] if stacks else None


class TransformerBlocks:
    """Residual attention blocks found by pattern (see analysis/attention.py); they hold nodes."""

    name: ClassVar[str] = "transformer-blocks"
    by_name: ClassVar[bool] = False

    @staticmethod
    def run(graph: Graph) -> list[TransformerBlock]:
        return find_transformer_blocks(graph)


class AnalysisCache:
    """The context's store of analysis results (see the module doc)."""

    def __init__(self) -> None:
        self._results: dict[tuple[int, str], tuple[weakref.ref, int, Any]] = {}
        self.computed: dict[str, int] = {}  # analysis name -> times run (for reports and tests)

    def get(self, graph: Graph, analysis: type[Analysis]) -> Any:
        """The result of `analysis` on `graph`, computed once per graph version."""
        key = (id(graph), analysis.name)
        found = self._results.get(key)
        if found is not None and found[0]() is graph and found[1] == graph.version:
            return found[2]
        value = analysis.run(graph)
        self.computed[analysis.name] = self.computed.get(analysis.name, 0) + 1
        self._results[key] = (weakref.ref(graph), graph.version, value)
        return value

    def preserve(self, old: Graph, new: Graph, analyses: tuple[type[Analysis], ...]) -> list[str]:
        """Carry the cached results of `analyses` from `old` to `new`; return the names carried."""
        carried = []
        for analysis in analyses:
            found = self._results.get((id(old), analysis.name))
            if not analysis.by_name or found is None or found[0]() is not old or found[1] != old.version:
                continue
            self._results[(id(new), analysis.name)] = (weakref.ref(new), new.version, found[2])
            carried.append(analysis.name)
        return carried

    def invalidate(self, graph: Graph) -> None:
        """Forget every result for `graph`."""
        for key in [k for k in self._results if k[0] == id(graph)]:
            del self._results[key]
