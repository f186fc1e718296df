"""Read-only views of a `Graph` for analyses and printing.

- `to_networkx`: the FX data-flow graph as a networkx DiGraph, one vertex
  per node (named like the node), carrying the node's metadata.
- `module_graph`: modules at a chosen depth as vertices, with an edge where
  a tensor flows from one module into another.
- `node_groups`: runs of consecutive op nodes that belong to the same module
  at a chosen depth; the printer's collapsed form and DOT use them.
- `module_types`: the class name of every module path the graph mentions.

Views copy what they need; changing a view never changes the graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx

from fxpress.ir.graph import Graph, owning_module

INPUTS = "<inputs>"  # module_graph vertex for the graph's placeholders
OUTPUTS = "<outputs>"  # module_graph vertex for the graph's output node
OP_KINDS = ("call_function", "call_method", "call_module")


def truncate_path(path: str, depth: int | None) -> str:
    """The first `depth` dot-separated components of a module path (all when None)."""
    if depth is None or not path:
        return path
    return ".".join(path.split(".")[:depth])


def target_name(node: torch.fx.Node) -> str:
    """A stable, short name for what a node calls: `aten.add.Tensor`, `torch.relu`, `blocks.0.fc`."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        text = str(target)
        return text[: -len(".default")] if text.endswith(".default") else text
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    try:
        name = torch.fx.node._get_qualified_name(target)
    except Exception:  # noqa: BLE001 - lambdas and odd callables have no qualified name
        name = getattr(target, "__qualname__", None) or type(target).__name__
    return name.replace("_operator.", "operator.", 1) if name.startswith("_operator.") else name


def module_types(graph: Graph) -> dict[str, str]:
    """Class name of every module path that owns a node ("" is the root), sorted by path."""
    found: dict[str, str] = {}
    for path, sub in graph.module.named_modules():
        cls = type(sub).__name__
        if cls not in ("Module", "GraphModule"):  # export leaves plain attribute holders
            found[path] = cls
    for node in graph.fx.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2]
            found.setdefault(str(path), cls_name)
        path, cls_name = owning_module(node)
        if cls_name:
            found.setdefault(path, cls_name)
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class NodeGroup:
    """A run of consecutive op nodes owned by one module at a given depth."""

    path: str  # module path truncated to the depth; "" for the top level
    module_type: str  # class name of that module, "" when unknown
    nodes: tuple[torch.fx.Node, ...]  # op nodes only; parameter reads are folded into `params`
    params: int  # numel of the unique parameters the run reads
    macs: int


def node_groups(graph: Graph, depth: int) -> list[NodeGroup]:
    """Op nodes grouped into runs of equal module path truncated to `depth` components.

    Placeholders, get_attr nodes and the output are not in any group.
    """
    types = module_types(graph)
    runs: list[tuple[str, list[torch.fx.Node]]] = []
    for node in graph.fx.nodes:
        if node.op not in OP_KINDS:
            continue
        path = truncate_path(graph.info(node).module_path, depth)
        if runs and runs[-1][0] == path:
            runs[-1][1].append(node)
        else:
            runs.append((path, [node]))
    return [NodeGroup(path=path, module_type=types.get(path, ""), nodes=tuple(nodes),
                      params=_unique_param_numel(graph, nodes),
                      macs=sum(graph.info(n).macs for n in nodes))
            for path, nodes in runs]


def _unique_param_numel(graph: Graph, nodes: list[torch.fx.Node]) -> int:
    seen: dict[int, int] = {}
    for node in nodes:
        for path in graph.info(node).params:
            value = graph.attribute(path)
            if isinstance(value, torch.nn.Parameter):
                seen.setdefault(id(value), value.numel())
    return sum(seen.values())


def to_networkx(graph: Graph, *, include_params: bool = False) -> nx.DiGraph:
    """The data-flow graph: vertex per node (by name), edge input -> user.

    Vertex attributes: op, target, shape, dtype, module_path, module_type, macs,
    index (position in graph order).  get_attr nodes are left out unless
    `include_params`.
    """
    view = nx.DiGraph(name=graph.name)
    kept = [n for n in graph.fx.nodes if include_params or n.op != "get_attr"]
    for index, node in enumerate(kept):
        record = graph.info(node)
        view.add_node(node.name, op=node.op, target=target_name(node), shape=record.shape,
                      dtype=record.dtype, module_path=record.module_path,
                      module_type=record.module_type, macs=record.macs, index=index)
    for node in kept:
        for source in node.all_input_nodes:
            if source.name in view:
                view.add_edge(source.name, node.name)
    return view


def module_graph(graph: Graph, depth: int) -> nx.DiGraph:
    """Modules at `depth` as vertices, an edge wherever a tensor flows between two of them.

    Vertices are truncated module paths ("" for top-level ops), plus `INPUTS`
    and `OUTPUTS`; attributes: module_type, nodes (op count), macs.  Edge
    attribute `tensors` counts the node-level edges it stands for.
    """
    types = module_types(graph)
    view = nx.DiGraph(name=graph.name, depth=depth)
    owner: dict[torch.fx.Node, str] = {}
    for node in graph.fx.nodes:
        if node.op == "get_attr":
            continue
        vertex = _module_vertex(graph, node, depth)
        owner[node] = vertex
        if vertex not in view:
            view.add_node(vertex, module_type=types.get(vertex, ""), nodes=0, macs=0)
        if node.op in OP_KINDS:
            view.nodes[vertex]["nodes"] += 1
            view.nodes[vertex]["macs"] += graph.info(node).macs
    for node, vertex in owner.items():
        for source in node.all_input_nodes:
            start = owner.get(source)
            if start is None or start == vertex:
                continue
            if view.has_edge(start, vertex):
                view.edges[start, vertex]["tensors"] += 1
            else:
                view.add_edge(start, vertex, tensors=1)
    return view


def _module_vertex(graph: Graph, node: torch.fx.Node, depth: int) -> str:
    if node.op == "placeholder":
        return INPUTS
    if node.op == "output":
        return OUTPUTS
    return truncate_path(graph.info(node).module_path, depth)
