"""Checks before any backend builds: what a compiled model cannot do is refused in one line.

- Training-mode ops (``dropout(train=True)``, ``batch_norm(training=True)``,
  or a Dropout/BatchNorm module left in training mode in a symbolically
  traced graph): a compiled model is for inference, and backends disagreed
  about them (TVM dropped the mask, onnxruntime drew a new one per call).
- Higher-order ops (``torch.cond``, ``map``, ``while_loop``) a backend has
  no form of: each backend names the ones it lowers (``Backend.higher_order``).
- Writes into the model's own tensors (buffers): compiled models hold no state.

Writes into the inputs are not refused: the flat export copies those inputs first
(:mod:`fxpress.backends.structure`), so compiled models never change their arguments.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxpress.errors import LoweringError
from fxpress.ir import Graph
from fxpress.ir.opinfo import op_label

TRAINING_FLAGS = ("train", "training")
_TRAINING_MODULES = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
EVAL_FIX = "call model.eval() before fxpress.capture (compiled models run inference)"


def _argument(node: torch.fx.Node, name: str) -> Any:
    """The value of the argument called `name` (positional or keyword); None when absent."""
    if name in node.kwargs:
        return node.kwargs[name]
    names = [arg.name for arg in node.target._schema.arguments]
    index = names.index(name) if name in names else None
    return node.args[index] if index is not None and index < len(node.args) else None


def _in_training_mode(graph: Graph, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        module = graph.attribute(str(node.target))
        return isinstance(module, _TRAINING_MODULES) and module.training
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.target._schema.name.endswith("dropout") and _argument(node, "p") == 0:
        return False  # dropout with p=0 (e.g. attention dropout of a model in training mode) is the identity
    return any(_argument(node, flag) is True for flag in TRAINING_FLAGS)


def higher_order_name(node: torch.fx.Node) -> str | None:
    """``cond``, ``map_impl``, ``while_loop`` for a higher-order op's node; None for any other node."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.name()
    return None


def check_training_mode(graph: Graph) -> None:
    """LoweringError naming the first node that runs in training mode."""
    for node in graph.fx.nodes:
        if _in_training_mode(graph, node):
            what = f"module {node.target}" if node.op == "call_module" else f"op {op_label(node.target)}"
            raise LoweringError(f"{what} at node {node.name} of graph {graph.name} runs in training mode "
                                f"(random dropout masks or batch statistics); {EVAL_FIX}")


def check_higher_order(graph: Graph, backend: str, supported: tuple[str, ...] | None, fix: str) -> None:
    """LoweringError naming the first higher-order op `backend` has no form of (None: it runs them all)."""
    if supported is None:
        return
    for node in graph.fx.nodes:
        name = higher_order_name(node)
        if name is not None and name not in supported:
            lowered = ", ".join(f"torch.{op}" for op in supported) or "none"
            raise LoweringError(f"op torch.{name} at node {node.name} of graph {graph.name} has no "
                                f"{backend} form (it lowers {lowered}); {fix}")


def check_compilable(graph: Graph, backend: str, higher_order: tuple[str, ...] | None, fix: str) -> None:
    """Every check above, for `backend` (which lowers the higher-order ops in `higher_order`)."""
    check_training_mode(graph)
    check_higher_order(graph, backend, higher_order, fix)
