"""What a pass changed: nodes added, removed and rewired, collapsed by module, with MAC/param deltas.

Nodes are matched by name (passes copy graphs, and torch.fx keeps names
across copies); a node that kept its name but now computes another op, or
reads other inputs, is *rewired*.  Module paths are collapsed to the block
they belong to (``layers.3.mlp.up`` -> ``layers.3``) so a diff of a
30-block model reads as 30 rows, not 3000.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxpress.ir.graph import Graph
from fxpress.ir.opinfo import op_qualname
from fxpress.ir.printer import TOP, format_node

MAX_LISTED = 200  # node lines kept per kind; a diff of a whole-model rewrite stays readable


@dataclass
class ModuleDelta:
    """One row of a diff: a module (collapsed to its block) and what changed in it."""

    module: str
    added: int = 0
    removed: int = 0
    rewired: int = 0
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    weights_changed: int = 0  # parameters kept under the same name whose values changed (training)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rewired or self.weights_changed
                    or self.macs_before != self.macs_after or self.params_before != self.params_after)


@dataclass
class GraphDiff:
    """Everything that differs between two graphs, by module and node by node."""

    modules: list[ModuleDelta] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rewired: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # added/removed/rewired before truncation

    @property
    def changed(self) -> bool:
        return any(self.counts.values()) or any(m.changed for m in self.modules)

    def summary(self) -> str:
        """`+12 nodes, -3 nodes, 4 rewired` (the counts that are not zero)."""
        parts = [f"+{self.counts['added']} nodes" if self.counts.get("added") else "",
                 f"-{self.counts['removed']} nodes" if self.counts.get("removed") else "",
                 f"{self.counts['rewired']} rewired" if self.counts.get("rewired") else ""]
        return ", ".join(p for p in parts if p) or "no node changed"


def block_path(path: str) -> str:
    """A module path cut after its first numeric component (the block): `layers.3.mlp` -> `layers.3`;
    paths without one keep their first two components."""
    parts = path.split(".") if path else []
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:2])


def _signature(node: torch.fx.Node) -> tuple:
    inputs = tuple(a.name for a in node.all_input_nodes)
    return node.op, op_qualname(node.target) if callable(node.target) else str(node.target), inputs


def _module_of(graph: Graph, node: torch.fx.Node) -> str:
    return block_path(graph.info(node).module_path) or TOP


def macs_by_block(graph: Graph) -> dict[str, int]:
    """MACs summed per block path."""
    totals: dict[str, int] = {}
    for node in graph.fx.nodes:
        macs = graph.info(node).macs
        if macs:
            key = _module_of(graph, node)
            totals[key] = totals.get(key, 0) + macs
    return totals


def _parameters(graph: Graph) -> dict[str, torch.Tensor]:
    """Each parameter the graph reads once, under the smallest of its names (tied weights, such as an
    embedding and an LM head, land in the same block whichever reader comes first)."""
    names: dict[int, str] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in graph.referenced_tensors().items():
        if isinstance(tensor, torch.nn.Parameter):
            names[id(tensor)] = min(name, names.get(id(tensor), name))
            tensors[id(tensor)] = tensor
    return {names[key]: tensors[key] for key in names}


def params_by_block(graph: Graph) -> dict[str, int]:
    """Parameters per block path (a tensor read by several blocks counts once, see `_parameters`)."""
    totals: dict[str, int] = {}
    for name, tensor in _parameters(graph).items():
        key = block_path(name.rpartition(".")[0]) or TOP
        totals[key] = totals.get(key, 0) + tensor.numel()
    return totals


def changed_weights_by_block(before: Graph, after: Graph) -> dict[str, int]:
    """Parameters present under one name in both graphs, same shape, other values: counted per block."""
    old = _parameters(before)
    totals: dict[str, int] = {}
    for name, tensor in _parameters(after).items():
        previous = old.get(name)
        if previous is None or previous is tensor or previous.shape != tensor.shape or torch.equal(previous, tensor):
            continue
        key = block_path(name.rpartition(".")[0]) or TOP
        totals[key] = totals.get(key, 0) + tensor.numel()
    return totals


def graph_diff(before: Graph, after: Graph) -> GraphDiff:
    """The semantic diff of `after` against `before`."""
    old = {n.name: n for n in before.fx.nodes}
    new = {n.name: n for n in after.fx.nodes}
    rows: dict[str, ModuleDelta] = {}

    def row(module: str) -> ModuleDelta:
        return rows.setdefault(module, ModuleDelta(module))

    diff = GraphDiff()
    kinds = {"added": [], "removed": [], "rewired": []}
    for name, node in new.items():
        if name not in old or _signature(old[name])[:2] != _signature(node)[:2]:
            kinds["added"].append((after, node))
            if name in old:
                kinds["removed"].append((before, old[name]))
        elif _signature(old[name]) != _signature(node):
            kinds["rewired"].append((after, node))
    kinds["removed"] += [(before, node) for name, node in old.items() if name not in new]
    for kind, entries in kinds.items():
        for graph, node in entries:
            delta = row(_module_of(graph, node))
            setattr(delta, kind, getattr(delta, kind) + 1)
        getattr(diff, kind).extend(format_node(g, n).strip() for g, n in entries[:MAX_LISTED])
        diff.counts[kind] = len(entries)
    for module, macs in macs_by_block(before).items():
        row(module).macs_before = macs
    for module, macs in macs_by_block(after).items():
        row(module).macs_after = macs
    for module, params in params_by_block(before).items():
        row(module).params_before = params
    for module, params in params_by_block(after).items():
        row(module).params_after = params
    for module, count in changed_weights_by_block(before, after).items():
        row(module).weights_changed = count
    diff.modules = [rows[m] for m in _module_order(before, after, rows) if rows[m].changed]
    return diff


def _module_order(before: Graph, after: Graph, rows: dict[str, ModuleDelta]) -> list[str]:
    """Modules in graph order: as they first appear in `before`, then the new ones of `after`."""
    order: dict[str, None] = {}
    for graph in (before, after):
        for node in graph.fx.nodes:
            order.setdefault(_module_of(graph, node), None)
    return [m for m in order if m in rows] + sorted(m for m in rows if m not in order)
