"""Follow a dimension through a graph and list every parameter slice coupled to it.

Removing output channel i of an MLP's `gate_proj` is only possible together
with row i of `up_proj` (their outputs are multiplied) and column i of
`down_proj` (it reads their product); removing a hidden channel of the
residual stream touches every layer.  `dimension_group` seeds a slice of one
tensor (a node, an axis, indices), propagates it forward and backward
through the per-op coupling rules (`fxpress.ops.coupling_rules`, attached to
each op's OpInfo as `coupling`) until nothing changes, and returns a
`DimensionGroup`: the `ParamSlice`s to remove together, in graph order, and
the removed part of every activation it reached (for the pass that rewrites
view sizes).  The conveniences:

    channel_group(graph, "model.model.layers.3.mlp.gate_proj", i)   output channel i of a layer
    head_group(graph, "model.model.layers.3.self_attn", h)           query head h of an attention
    kv_head_group(graph, "model.model.layers.3.self_attn", j)        key/value head j (grouped-query)

A copied tensor loses an element only when every copy does: in a
grouped-query model, a query head's group keeps its KV head (other query
heads still read it), while a KV head's group holds every query head that
shares it.  An op without a coupling rule is a PreconditionError naming the
op and the node.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

from fxpress.analysis.dimension_slices import (ParamSlice, describe_seed, group_lines, parameter_slices,
                                               tensor_slices)
from fxpress.errors import PreconditionError
from fxpress.ir.graph import META_KEY, Graph, shape_of
from fxpress.ir.opinfo import op_name
from fxpress.ops.coupling_masks import compress
from fxpress.ops.coupling_rules import coupling_rule

Key = tuple[Node, Any]  # (node, output item or None)

__all__ = ["DimensionGroup", "ParamSlice", "channel_group", "dimension_group", "head_group", "kv_head_group",
           "kv_source"]


@dataclass
class DimensionGroup:
    """Everything removed with one seeded slice: parameter slices and activation masks."""

    seed: str
    slices: list[ParamSlice]
    masks: dict[Key, torch.Tensor] = field(default_factory=dict, repr=False)  # masks of every reached tensor
    inputs: list[ParamSlice] = field(default_factory=list)  # graph inputs touched (path = placeholder name)
    outputs: list[ParamSlice] = field(default_factory=list)  # graph outputs touched (path = "output[k]")

    def params(self) -> list[str]:
        """The attribute paths of the coupled parameters, in graph order."""
        return list(dict.fromkeys(s.path for s in self.slices))

    def __str__(self) -> str:
        return "\n".join(group_lines(self.seed, self.slices, self.inputs, self.outputs))


class _Tracker:
    """Masks of every reached tensor, grown to a fixed point by the coupling rules."""

    def __init__(self, graph: Graph, pass_name: str | None):
        self.graph, self.pass_name = graph, pass_name
        self.masks: dict[Key, torch.Tensor] = {}
        self.pending: deque[Node] = deque()
        self.queued: set[Node] = set()
        self.aliases = _tied_parameters(graph)

    # -- the CouplingContext the rules see (bound to one node by `_Ctx`) --------------------------
    def shape(self, tensor: Node, item: Any = None) -> tuple[int, ...]:
        if item is None or item == 0:
            return shape_of(tensor)
        return tuple(tensor.meta[META_KEY].extra_outputs[item - 1][0])

    def couple(self, tensor: Node, mask: torch.Tensor, item: Any = None) -> None:
        mask = compress(mask.to(torch.bool))
        if not mask.any():
            return
        shape = self.shape(tensor, item)
        if mask.dim() != len(shape) or any(m not in (1, s) for m, s in zip(mask.shape, shape)):
            raise self.fail(tensor, f"a coupling rule gave a mask of shape {list(mask.shape)} for a tensor of "
                                    f"shape {list(shape)}")
        old = self.masks.get((tensor, item))
        if old is not None and not (mask & ~old).any():
            return
        self.masks[(tensor, item)] = mask if old is None else compress(old | mask)
        self._schedule(tensor)
        for alias in self.aliases.get(tensor, ()):
            self.couple(alias, mask)

    def fail(self, node: Node, why: str) -> PreconditionError:
        return PreconditionError(f"cannot follow the dimension through {node.format_node()}: {why}",
                                 self.pass_name)

    # -- the fixed point ------------------------------------------------------------------------
    def _schedule(self, tensor: Node) -> None:
        for node in (tensor, *tensor.users):
            if node not in self.queued:
                self.queued.add(node)
                self.pending.append(node)

    def run(self) -> None:
        while self.pending:
            node = self.pending.popleft()
            self.queued.discard(node)
            if node.op == "call_function":
                self._apply(node)
            elif node.op == "call_module":
                raise self.fail(node, "module calls are not followed; capture with torch.export "
                                      "(fxpress.capture) to get ATen ops")

    def _apply(self, node: Node) -> None:
        rule = coupling_rule(node.target)
        if rule is None:
            raise self.fail(node, f"op {op_name(node.target)} has no coupling rule; add one to COUPLING_RULES "
                                  "in fxpress/ops/coupling_rules.py (a function that couples the masks of the "
                                  "op's inputs and output both ways)")
        rule(_Ctx(self, node))


class _Ctx:
    """The tracker seen from one node (see `fxpress.ops.coupling_rules.CouplingContext`)."""

    def __init__(self, tracker: _Tracker, node: Node):
        self.tracker, self.node = tracker, node

    def mask(self, tensor: Any, item: Any = None) -> torch.Tensor | None:
        return self.tracker.masks.get((tensor, item)) if isinstance(tensor, Node) else None

    def couple(self, tensor: Any, mask: torch.Tensor, item: Any = None) -> None:
        if isinstance(tensor, Node):
            self.tracker.couple(tensor, mask, item)

    def shape(self, tensor: Any, item: Any = None) -> tuple[int, ...]:
        return self.tracker.shape(tensor, item)

    def fail(self, why: str) -> PreconditionError:
        return self.tracker.fail(self.node, why)


def _tied_parameters(graph: Graph) -> dict[Node, list[Node]]:
    """get_attr nodes that read the same tensor under different paths (tied embeddings)."""
    by_tensor: dict[int, list[Node]] = {}
    for node in graph.fx.nodes:
        if node.op == "get_attr" and node.users:
            value = graph.attribute(str(node.target))
            if isinstance(value, torch.Tensor):
                by_tensor.setdefault(id(value), []).append(node)
    return {n: [m for m in nodes if m is not n] for nodes in by_tensor.values() if len(nodes) > 1 for n in nodes}


# -- public API -----------------------------------------------------------------------------------
def dimension_group(graph: Graph, node: Node | str, axis: int, indices: Any, *,
                    pass_name: str | None = None, seed: str | None = None) -> DimensionGroup:
    """Every slice coupled to `indices` along `axis` of `node`'s output (a node or its name; a get_attr
    node seeds a parameter slice)."""
    if isinstance(node, str):
        node = _node_named(graph, node)
    shape = shape_of(node)
    if not shape:
        raise PreconditionError(f"cannot seed a dimension at {node.format_node()}: it has no tensor output",
                                pass_name)
    axis %= len(shape)
    indices = [int(i) for i in ([indices] if isinstance(indices, int) else indices)]
    if not indices or any(not 0 <= i < shape[axis] for i in indices):
        raise PreconditionError(f"indices {indices} are out of range for axis {axis} of {list(shape)} at "
                                f"{node.format_node()}", pass_name)
    vector = torch.zeros(shape[axis], dtype=torch.bool)
    vector[indices] = True
    tracker = _Tracker(graph, pass_name)
    tracker.couple(node, vector.reshape([shape[axis] if a == axis else 1 for a in range(len(shape))]))
    tracker.run()
    return DimensionGroup(seed or describe_seed(node, axis, indices),
                          parameter_slices(graph, tracker.masks), dict(tracker.masks),
                          *tensor_slices(graph, tracker.masks))


def channel_group(graph: Graph, layer: str | Node, index: Any, **options: Any) -> DimensionGroup:
    """Output channel(s) `index` of a linear, conv, embedding or norm layer (a module path or its node)."""
    node, axis = _channel_seed(graph, layer)
    label = layer if isinstance(layer, str) else layer.name
    return dimension_group(graph, node, axis, index, seed=f"output channel {index} of {label}", **options)


def head_group(graph: Graph, attention: str, head: int, **options: Any) -> DimensionGroup:
    """Query head `head` of the attention at module path `attention`: the head axis of its output."""
    sdpa = _attention_node(graph, attention)
    rank = len(shape_of(sdpa))
    return dimension_group(graph, sdpa, rank - 3, head, seed=f"query head {head} of {attention}", **options)


def kv_head_group(graph: Graph, attention: str, kv_head: int, **options: Any) -> DimensionGroup:
    """Key/value head `kv_head` of the attention at `attention`, with every query head that reads it."""
    key = kv_source(_attention_node(graph, attention))
    rank = len(shape_of(key))
    return dimension_group(graph, key, rank - 3, kv_head, seed=f"key/value head {kv_head} of {attention}",
                           **options)


def _node_named(graph: Graph, name: str) -> Node:
    for node in graph.fx.nodes:
        if node.name == name:
            return node
    raise PreconditionError(f"graph {graph.name} has no node named {name!r}")


_WEIGHT_OUTPUT_AXIS = {"aten.embedding.default": 1}  # otherwise a weight's output channels are its axis 0


def _channel_seed(graph: Graph, layer: str | Node) -> tuple[Node, int]:
    """The weight get_attr node of `layer` and the weight axis of its output channels."""
    calls = [layer] if isinstance(layer, Node) else \
        [n for n in graph.fx.nodes if n.op == "call_function" and n.meta[META_KEY].module_path == layer]
    for call in calls:
        weights = [a for a in call.args[:2] if isinstance(a, Node) and a.op == "get_attr"]
        if weights:
            return weights[0], _WEIGHT_OUTPUT_AXIS.get(op_name(call.target), 0)
    raise PreconditionError(f"no op of {layer!r} reads a weight; name a linear, conv, embedding or norm layer "
                            "by module path (as in graph dumps)")


def _attention_node(graph: Graph, attention: str) -> Node:
    found = [n for n in graph.fx.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default
             and (n.meta[META_KEY].module_path + ".").startswith(attention + ".")]
    if len(found) != 1:
        raise PreconditionError(f"expected one scaled_dot_product_attention under {attention!r}, found "
                                f"{len(found)}; name the attention module (as in graph dumps), or, for attention written with "
                                "matmul, seed its head axis with dimension_group(graph, node, axis, head)")
    return found[0]


def kv_source(sdpa: Node) -> Node:
    """The key tensor before grouped-query repetition (`repeat_kv`: unsqueeze, expand, reshape): walk back
    from the sdpa's key through single-input ops to a tensor shaped like it with fewer heads."""
    heads, key = shape_of(sdpa.args[0])[-3], sdpa.args[1]
    node, key_shape = key, shape_of(key)
    for _ in range(8):
        shape = shape_of(node)
        if len(shape) == len(key_shape) and shape[-2:] == key_shape[-2:] and shape[-3] < heads and \
                heads % shape[-3] == 0:
            return node
        inputs = [a for a in node.all_input_nodes if shape_of(a)]
        if node.op != "call_function" or len(inputs) != 1:
            break
        node = inputs[0]
    return key
