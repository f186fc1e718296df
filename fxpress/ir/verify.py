"""Verification of a Graph: FX lint, attribute references, metadata consistency.

`verify(graph)` raises VerificationError naming the first bad node; it is
what the verify-after-pass instrument and the tests call.  Besides FX's lint
and the attribute references it checks provenance (every `call_function`
node says where it came from: capture, or the pass that built it through
`fxpress.ir.builder`) and that torch.export's shape metadata, where a node
still carries it, agrees with fxpress's NodeInfo.
"""
from __future__ import annotations

from typing import Any

import torch

from fxpress.errors import VerificationError
from fxpress.ir.builder import origin
from fxpress.ir.graph import META_KEY, Graph, NodeInfo, dtype_name


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
        _check_provenance(graph, node)
        _check_export_meta(graph, node)
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


def _check_provenance(graph: Graph, node: torch.fx.Node) -> None:
    if node.op == "call_function" and origin(node) is None:
        raise VerificationError(f"{graph.name}: node has no provenance: {node.format_node()}; create nodes "
                                "through fxpress.ir.builder.Builder, which copies an anchor's module path")


def _check_export_meta(graph: Graph, node: torch.fx.Node) -> None:
    fake = node.meta.get("val")
    record: NodeInfo = node.meta[META_KEY]
    fakes = [fake] if isinstance(fake, torch.Tensor) else \
        [f for f in fake if isinstance(f, torch.Tensor)] if isinstance(fake, (tuple, list)) else []
    recorded = ([(record.shape, record.dtype)] if record.shape is not None else []) + list(record.extra_outputs)
    if not fakes or len(fakes) != len(recorded):
        return
    for f, (shape, dtype) in zip(fakes, recorded):
        if f.dim() != len(shape) or any(isinstance(a, int) and a != b for a, b in zip(f.shape, shape)) or \
                dtype_name(f.dtype) != dtype:
            raise VerificationError(f"{graph.name}: stale metadata on {node.format_node()}: torch.export's "
                                    f"says {list(f.shape)} {f.dtype}, NodeInfo says {list(shape)} {dtype}; "
                                    "re-annotate the graph (graph.recompile()) after rewriting")


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
