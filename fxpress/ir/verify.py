"""Verification of a Graph: FX lint, attribute references, metadata consistency.

`verify(graph)` raises VerificationError naming the first bad node; it is
what the verify-after-pass instrument and the tests call.
"""
from __future__ import annotations

from typing import Any

import torch

from fxpress.errors import VerificationError
from fxpress.ir.graph import META_KEY, Graph, NodeInfo


def verify(graph: Graph, *, check_shapes: bool = True) -> None:
    """Raise VerificationError unless the graph is well formed and its metadata is current."""
    try:
        graph.fx.lint()
    except Exception as err:  # noqa: BLE001 - fx raises RuntimeError or AssertionError
        raise VerificationError(f"{graph.name}: FX lint failed: {err}") from err
    outputs = [n for n in graph.fx.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise VerificationError(f"{graph.name}: expected one output node, found {len(outputs)}")
    for node in graph.fx.nodes:
        _check_target(graph, node)
        if META_KEY not in node.meta:
            raise VerificationError(f"{graph.name}: node has no metadata (call graph.annotate()): "
                                    f"{node.format_node()}")
    if check_shapes:
        _check_recorded_shapes(graph)


def _check_target(graph: Graph, node: torch.fx.Node) -> None:
    if node.op not in ("get_attr", "call_module"):
        return
    try:
        value: Any = graph.attribute(str(node.target))
    except AttributeError as err:
        raise VerificationError(f"{graph.name}: node reads a missing attribute: {node.format_node()}") from err
    if node.op == "call_module" and not isinstance(value, torch.nn.Module):
        raise VerificationError(f"{graph.name}: call_module target is not a module: {node.format_node()}")


def _check_recorded_shapes(graph: Graph) -> None:
    """Re-run the graph on its example inputs; every recorded shape and dtype must match."""
    fresh = graph.copy()
    fresh.annotate()
    recorded = {n.name: n.meta[META_KEY] for n in graph.fx.nodes}
    for node in fresh.fx.nodes:
        now: NodeInfo = node.meta[META_KEY]
        before = recorded[node.name]
        if (now.shape, now.dtype, now.macs) != (before.shape, before.dtype, before.macs):
            raise VerificationError(
                f"{graph.name}: stale metadata on {node.format_node()}: recorded "
                f"{before.dtype}{list(before.shape or [])} macs={before.macs}, actual "
                f"{now.dtype}{list(now.shape or [])} macs={now.macs}; call graph.annotate() after rewriting")
