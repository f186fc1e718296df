"""Rewrite helpers every pass shares: reachability, dead-node erasure, fresh tensors, constants.

Tensors are shared between a graph and its copies (`Graph.copy`), so a pass
never writes into one: `add_tensor` registers a new tensor under a fresh
name instead, and the old one is dropped by `Graph.remove_unused_attributes`
once nothing reads it.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx
from torch.fx import Node

from fxpress.errors import PassError
from fxpress.ir.graph import Graph

aten = torch.ops.aten
METADATA_ASSERTS = (aten._assert_tensor_metadata.default,)


def ancestors(node: Node, within: set[Node] | None = None) -> set[Node]:
    """Every node `node` reads, transitively (not itself); only inside `within` when given."""
    seen: set[Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current in seen or (within is not None and current not in within):
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return seen


def reaches_input(node: Node, *, through_shapes: bool = True) -> bool:
    """Whether `node` reads a placeholder (ignoring `sym_size` shape reads unless `through_shapes`)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return True
        if current.target == aten.sym_size.int and not through_shapes:
            continue
        stack.extend(current.all_input_nodes)
    return False


def erase_dead(graph: Graph, seeds: Iterable[Node]) -> int:
    """Erase `seeds`, then their producers, while nothing but metadata asserts reads them; return the count.

    Placeholders, the output and impure ops (other than the asserts) are never erased.
    """
    pending, erased = list(seeds), set()
    while pending:
        node = pending.pop()
        if node in erased or node.op in ("placeholder", "output"):
            continue
        users = list(node.users)
        if any(u.target not in METADATA_ASSERTS for u in users) or \
                (node.target not in METADATA_ASSERTS and node.is_impure()):
            continue
        inputs = node.all_input_nodes
        for user in users:
            graph.fx.erase_node(user)
            erased.add(user)
        graph.fx.erase_node(node)
        erased.add(node)
        pending.extend(inputs)
    return len(erased)


def erase_unused_get_attrs(graph: Graph) -> int:
    """Erase get_attr nodes nobody reads; return how many."""
    unused = [n for n in graph.fx.nodes if n.op == "get_attr" and not n.users]
    for node in unused:
        graph.fx.erase_node(node)
    return len(unused)


def fresh_leaf(module: torch.nn.Module, wanted: str) -> str:
    """`wanted`, or `wanted_1`, `wanted_2`, ... : the first attribute name `module` does not have."""
    leaf, suffix = wanted, 1
    while hasattr(module, leaf):
        leaf, suffix = f"{wanted}_{suffix}", suffix + 1
    return leaf


def add_tensor(graph: Graph, owner: str, wanted: str, value: torch.Tensor, *,
               parameter: bool = False, requires_grad: bool = False) -> str:
    """Register `value` on module `owner` (created if missing) under a fresh name; return its path.

    A parameter when `parameter`, else a buffer.  The caller's tensors are never written into.
    """
    module = _owner_module(graph, owner)
    leaf = fresh_leaf(module, wanted)
    if parameter:
        module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=requires_grad))
    else:
        module.register_buffer(leaf, value)
    return f"{owner}.{leaf}" if owner else leaf


def _owner_module(graph: Graph, owner: str) -> torch.nn.Module:
    module = graph.module
    for part in owner.split(".") if owner else []:
        child = getattr(module, part, None)
        if child is None:
            child = torch.nn.Module()
            module.add_module(part, child)
        elif not isinstance(child, torch.nn.Module):
            raise PassError(f"cannot add a tensor under '{owner}': '{part}' is a {type(child).__name__}, "
                            "not a module; rename it")
        module = child
    return module


def constant_nodes(graph: Graph) -> set[Node]:
    """Nodes whose value does not depend on the inputs: attributes and pure ops on them only."""
    constant: set[Node] = set()
    for node in graph.fx.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and not node.is_impure()
                                     and all(a in constant for a in node.all_input_nodes)):
            constant.add(node)
    return constant


def evaluate_constant(graph: Graph, node: Any, memo: dict | None = None) -> Any:
    """The value of a constant node: attributes read, pure ops run on them (recursively, memoized)."""
    memo = {} if memo is None else memo
    if not isinstance(node, Node):
        return node
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = graph.attribute(str(node.target))
        else:
            args = torch.fx.node.map_arg(node.args, lambda a: evaluate_constant(graph, a, memo))
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: evaluate_constant(graph, a, memo))
            with torch.no_grad():
                memo[node] = node.target(*args, **kwargs)
    return memo[node]
