"""A `Graph` as Google Model Explorer's graph JSON, with fxpress's shapes, dtypes, module paths and MACs.

Model Explorer (https://github.com/google-ai-edge/model-explorer) opens a
.json file holding a graph collection directly, with no adapter:

    {"label": "vit-mnist (fxpress)",
     "graphs": [{"id": "vit-mnist",
                 "nodes": [{"id": "linear", "label": "aten.linear", "namespace": "blocks/0/mlp/fc1",
                            "attrs": [{"key": "target", "value": "aten.linear"}, ...],
                            "incomingEdges": [{"sourceNodeId": "layer_norm", "sourceNodeOutputId": "0",
                                               "targetNodeInputId": "0"}, ...],
                            "outputsMetadata": [{"id": "0", "attrs": [{"key": "tensor_shape",
                                                                        "value": "f32[2,50,64]"}, ...]}]},
                           ...],
                 "groupNodeAttributes": {"": {...graph figures...}, "blocks/0": {"module_type": "Block", ...}}}]}

One Model Explorer node per FX node, with the FX name as its id.  A node's
namespace is its owning module path with "/" for "." (the top level is ""),
which Model Explorer draws as nested, collapsible layers; a parameter read
sits in the layer of the module that owns the parameter.  Every attribute
value is a string.  The order of nodes, attributes and edges follows the
graph, so the same graph gives the same bytes.
"""
from __future__ import annotations

import json
import operator
from pathlib import Path

import torch
import torch.fx

from fxpress.ir import Graph
from fxpress.ir.graph import NodeInfo
from fxpress.ir.printer import TOP, format_arg, format_header, type_text
from fxpress.ir.views import module_types, target_name

SUFFIX = ".model-explorer.json"


def namespace_of(module_path: str) -> str:
    """Model Explorer's layer path for a module path: `blocks.0.attn` -> `blocks/0/attn`, top level -> ""."""
    return module_path.replace(".", "/")


def _key_values(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in pairs if value != ""]


# -- one node ---------------------------------------------------------------------------
def _label(node: torch.fx.Node) -> str:
    """The text on the node: the op it runs, the input's name, the attribute's last component."""
    if node.op == "placeholder":
        return node.name
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[2]
    if node.op == "output":
        return "output"
    return target_name(node)


def _kind(graph: Graph, node: torch.fx.Node) -> str:
    if node.op != "get_attr":
        return {"placeholder": "input", "output": "output"}.get(node.op, node.op)
    value = graph.attribute(str(node.target))
    if isinstance(value, torch.nn.Parameter):
        return "parameter"
    return "buffer" if isinstance(value, torch.Tensor) else "attribute"


def _outputs(record: NodeInfo) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every tensor output, first output first."""
    first = [(record.shape, record.dtype)] if record.shape is not None else []
    return first + list(record.extra_outputs)


def _attrs(graph: Graph, node: torch.fx.Node, record: NodeInfo) -> list[dict[str, str]]:
    outputs = _outputs(record)
    pairs = [("op", _kind(graph, node)), ("target", target_name(node) if node.op != "output" else ""),
             ("type", ", ".join(type_text(shape, dtype) for shape, dtype in outputs)),
             ("module_path", record.module_path or TOP), ("module_type", record.module_type),
             ("macs", str(record.macs) if record.macs else ""), ("params", ", ".join(record.params))]
    if node.op in ("call_function", "call_method", "call_module"):
        pairs += [(f"arg{i}", format_arg(arg)) for i, arg in enumerate(node.args)]
        pairs += [(str(key), format_arg(value)) for key, value in node.kwargs.items()]
    return _key_values(pairs)


def _input_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes among `node`'s arguments, in argument order, repeats kept (`mul(x, x)` has two inputs)."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, dict(node.kwargs)), found.append)
    return found


def _output_index(graph: Graph, node: torch.fx.Node, source: torch.fx.Node) -> str:
    """Which output of `source` an edge into `node` carries: k for `getitem(source, k)`, else "0"."""
    if node.target is operator.getitem and isinstance(node.args[1], int) and graph.info(source).extra_outputs:
        return str(node.args[1])
    return "0"


def _incoming_edges(graph: Graph, node: torch.fx.Node) -> list[dict[str, str]]:
    return [{"sourceNodeId": source.name, "sourceNodeOutputId": _output_index(graph, node, source),
             "targetNodeInputId": str(index)} for index, source in enumerate(_input_nodes(node))]


def _outputs_metadata(record: NodeInfo) -> list[dict]:
    return [{"id": str(index), "attrs": _key_values([("tensor_shape", type_text(shape, dtype)),
                                                     ("shape", str(list(shape))), ("dtype", dtype)])}
            for index, (shape, dtype) in enumerate(_outputs(record))]


def node_json(graph: Graph, node: torch.fx.Node) -> dict:
    """One Model Explorer GraphNode for an FX node."""
    record = graph.info(node)
    path = record.module_path if node.op not in ("placeholder", "output") else ""
    return {"id": node.name, "label": _label(node), "namespace": namespace_of(path),
            "attrs": _attrs(graph, node, record), "incomingEdges": _incoming_edges(graph, node),
            "outputsMetadata": _outputs_metadata(record)}


# -- layers -----------------------------------------------------------------------------
def _ancestors(module_path: str) -> list[str]:
    """`a.b.c` -> ["a", "a.b", "a.b.c"]; the top level has none."""
    parts = module_path.split(".") if module_path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def group_attributes(graph: Graph) -> dict[str, dict[str, str]]:
    """Side-panel attributes per layer (namespace -> key -> value): the module's class, its nodes,
    parameters and MACs (its submodules included); "" holds the whole graph's figures."""
    types = module_types(graph)
    nodes: dict[str, int] = {}
    macs: dict[str, int] = {}
    params: dict[str, set[str]] = {}
    for node in graph.fx.nodes:
        record = graph.info(node)
        for path in _ancestors(record.module_path if node.op not in ("placeholder", "output") else ""):
            nodes[path] = nodes.get(path, 0) + 1
            macs[path] = macs.get(path, 0) + record.macs
            params.setdefault(path, set()).update(record.params)
    groups = {"": {"graph": format_header(graph)} | {key: f"{value:,}" for key, value in graph.figures().items()}}
    for path in nodes:
        numel = sum(graph.attribute(name).numel() for name in params[path])
        groups[namespace_of(path)] = {key: value for key, value in (
            ("module_path", path), ("module_type", types.get(path, "")), ("nodes", f"{nodes[path]:,}"),
            ("params", f"{numel:,}"), ("macs", f"{macs[path]:,}")) if value}
    return groups


# -- the file ---------------------------------------------------------------------------
def to_model_explorer(graph: Graph) -> dict:
    """The graph as a Model Explorer graph collection: {"label", "graphs": [{"id", "nodes", ...}]}."""
    graph_json = {"id": graph.name, "nodes": [node_json(graph, node) for node in graph.fx.nodes],
                  "groupNodeAttributes": group_attributes(graph)}
    return {"label": f"{graph.name} (fxpress)", "graphs": [graph_json]}


def write_model_explorer(graph: Graph, path: str | Path) -> Path:
    """Write `to_model_explorer(graph)` as JSON to `path` (folders made as needed); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(to_model_explorer(graph), indent=1) + "\n")
    return target
