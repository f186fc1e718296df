"""Model Explorer graph JSON: vit-mnist (and SmolLM2, slow) give files that satisfy the format Model Explorer
loads (a graph collection: label, graphs of nodes with ids, labels, namespaces, key/value attributes,
incoming edges and outputs metadata), and that say what fxpress's own metadata says about every node."""
from __future__ import annotations

import json

import pytest
import torch

import fxpress
from fxpress.export.model_explorer import namespace_of, to_model_explorer, write_model_explorer
from fxpress.ir.printer import output_text
from fxpress.zoo.specs import resolve_model

# The fields of Model Explorer's GraphNode / IncomingEdge / MetadataItem / KeyValue (its graph_builder.py)
NODE_REQUIRED = {"id", "label", "namespace"}
NODE_ALLOWED = NODE_REQUIRED | {"subgraphIds", "attrs", "incomingEdges", "outputsMetadata", "inputsMetadata",
                                "style", "config"}
EDGE_KEYS = {"sourceNodeId", "sourceNodeOutputId", "targetNodeInputId"}
GRAPH_ALLOWED = {"id", "nodes", "groupNodeAttributes", "groupNodeConfigs", "nodeLabelsToHide", "tasksData",
                 "layoutConfigs"}


# -- the format --------------------------------------------------------------------------
def check_key_values(items) -> dict[str, str]:
    """A list of {"key": str, "value": str} with unique keys; returns them as a dict."""
    assert isinstance(items, list)
    for item in items:
        assert set(item) == {"key", "value"}, item
        assert isinstance(item["key"], str) and item["key"], item
        assert isinstance(item["value"], str), item
    keys = [item["key"] for item in items]
    assert len(keys) == len(set(keys)), keys
    return {item["key"]: item["value"] for item in items}


def check_namespace(namespace: str) -> None:
    assert isinstance(namespace, str)
    if namespace:
        assert all(part for part in namespace.split("/")), f"empty layer in namespace {namespace!r}"


def check_node(node: dict) -> None:
    assert NODE_REQUIRED <= set(node) <= NODE_ALLOWED, sorted(node)
    assert isinstance(node["id"], str) and node["id"]
    assert isinstance(node["label"], str) and node["label"]
    check_namespace(node["namespace"])
    check_key_values(node.get("attrs", []))
    inputs = []
    for edge in node.get("incomingEdges", []):
        assert set(edge) == EDGE_KEYS, edge
        assert all(isinstance(edge[key], str) for key in EDGE_KEYS), edge
        inputs.append(edge["targetNodeInputId"])
    assert len(inputs) == len(set(inputs)), f"node {node['id']}: two edges into one input"
    outputs = []
    for item in node.get("outputsMetadata", []):
        assert set(item) <= {"id", "attrs"} and isinstance(item["id"], str), item
        check_key_values(item.get("attrs", []))
        outputs.append(item["id"])
    assert len(outputs) == len(set(outputs)), f"node {node['id']}: repeated output ids"


def validate_model_explorer(data: dict) -> dict[str, dict]:
    """Assert `data` is a graph collection Model Explorer loads; returns the first graph's nodes by id."""
    assert set(data) == {"label", "graphs"} and isinstance(data["label"], str) and data["label"]
    assert isinstance(data["graphs"], list) and data["graphs"]
    for graph in data["graphs"]:
        assert {"id", "nodes"} <= set(graph) <= GRAPH_ALLOWED, sorted(graph)
        assert isinstance(graph["id"], str) and graph["id"]
        assert isinstance(graph["nodes"], list) and graph["nodes"]
        for node in graph["nodes"]:
            check_node(node)
        by_id = {node["id"]: node for node in graph["nodes"]}
        assert len(by_id) == len(graph["nodes"]), "node ids are not unique"
        for node in graph["nodes"]:
            for edge in node.get("incomingEdges", []):
                source = by_id.get(edge["sourceNodeId"])
                assert source is not None, f"edge into {node['id']} from missing node {edge['sourceNodeId']}"
                produced = {item["id"] for item in source.get("outputsMetadata", [])}
                assert not produced or edge["sourceNodeOutputId"] in produced, (node["id"], edge)
        layers = {"/".join(node["namespace"].split("/")[:i + 1])
                  for node in graph["nodes"] if node["namespace"]
                  for i in range(node["namespace"].count("/") + 1)}
        groups = graph.get("groupNodeAttributes", {})
        assert set(groups) <= layers | {""}, set(groups) - layers
        for values in groups.values():
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
    assert json.loads(json.dumps(data)) == data
    return {node["id"]: node for node in data["graphs"][0]["nodes"]}


# -- what it says about the graph ---------------------------------------------------------------
def check_against_graph(graph, nodes: dict[str, dict]) -> None:
    """One Model Explorer node per FX node, in order; namespaces are module paths; attributes, outputs and
    edges are fxpress's metadata and the FX inputs."""
    fx_nodes = list(graph.fx.nodes)
    assert list(nodes) == [node.name for node in fx_nodes]
    for fx_node in fx_nodes:
        node, info = nodes[fx_node.name], graph.info(fx_node)
        attrs = check_key_values(node["attrs"])
        if fx_node.op not in ("placeholder", "output"):
            assert node["namespace"] == info.module_path.replace(".", "/"), fx_node.name
            assert attrs["module_path"] == (info.module_path or "<top>")
        assert attrs.get("macs", "0") == str(info.macs)
        if info.shape is not None:
            shapes = [item_attrs["tensor_shape"] for item_attrs in
                      (check_key_values(item["attrs"]) for item in node["outputsMetadata"])]
            assert ", ".join(shapes) == output_text(info).strip("()")
            assert attrs["type"] == ", ".join(shapes)
        sources = [edge["sourceNodeId"] for edge in node["incomingEdges"]]
        expected = []
        torch.fx.node.map_arg((fx_node.args, dict(fx_node.kwargs)), lambda n: expected.append(n.name))
        assert sources == expected, fx_node.name


def _capture(name: str, dynamic: bool = True):
    model = resolve_model(name)
    dims = (model.dynamic_dims or False) if dynamic else False
    return fxpress.ir.capture(model.module, model.example_inputs, dynamic=dims, name=model.name)


@pytest.fixture(scope="module")
def vit():
    return _capture("vit-mnist")


def test_vit_mnist_is_valid_model_explorer_json(vit, tmp_path):
    data = to_model_explorer(vit)
    nodes = validate_model_explorer(data)
    check_against_graph(vit, nodes)
    assert data["graphs"][0]["id"] == "vit-mnist"
    assert nodes["linear_16"]["namespace"] == "head"
    qkv = check_key_values(nodes["blocks_0_attn_qkv_weight"]["attrs"])
    assert nodes["blocks_0_attn_qkv_weight"]["namespace"] == "blocks/0/attn/qkv"
    assert qkv["op"] == "parameter" and qkv["target"] == "blocks.0.attn.qkv.weight"
    groups = data["graphs"][0]["groupNodeAttributes"]
    assert groups["blocks/0"]["module_type"] == "Block"
    assert groups[""]["macs"] == f"{vit.macs:,}"
    assert sum(int(groups[f"blocks/{i}"]["macs"].replace(",", "")) for i in range(4)) \
        == int(groups["blocks"]["macs"].replace(",", ""))
    path = write_model_explorer(vit, tmp_path / "out" / "vit.model-explorer.json")
    assert json.loads(path.read_text()) == data
    assert path.read_text() == write_model_explorer(vit, tmp_path / "again.json").read_text()  # deterministic


class TwoHalves(torch.nn.Module):
    def forward(self, x):
        low, high = x.chunk(2, dim=-1)
        return low * high + x[..., :2]


def test_multi_output_nodes_have_one_output_id_per_tensor():
    graph = fxpress.capture(TwoHalves(), (torch.randn(2, 4),))
    nodes = validate_model_explorer(to_model_explorer(graph))
    check_against_graph(graph, nodes)
    chunk = next(node for node in nodes.values() if node["label"].startswith("aten.chunk"))
    assert [item["id"] for item in chunk["outputsMetadata"]] == ["0", "1"]
    getitems = [node for node in nodes.values()
                if any(edge["sourceNodeId"] == chunk["id"] for edge in node["incomingEdges"])]
    assert sorted(node["incomingEdges"][0]["sourceNodeOutputId"] for node in getitems) == ["0", "1"]
    mul = next(node for node in nodes.values() if node["label"].startswith("aten.mul"))
    assert [edge["targetNodeInputId"] for edge in mul["incomingEdges"]] == ["0", "1"]


def test_namespace_of_module_paths():
    assert namespace_of("") == ""
    assert namespace_of("model.layers.3.self_attn") == "model/layers/3/self_attn"


@pytest.mark.slow
def test_smollm2_is_valid_model_explorer_json():
    graph = _capture("smollm2", dynamic=False)  # static: the layers are the same, the capture is faster
    data = to_model_explorer(graph)
    nodes = validate_model_explorer(data)
    check_against_graph(graph, nodes)
    layers = {node["namespace"].split("/")[3] for node in nodes.values()
              if node["namespace"].startswith("model/model/layers/")}
    assert layers == {str(i) for i in range(30)}
    assert data["graphs"][0]["groupNodeAttributes"]["model/model/layers/0"]["module_type"] == "LlamaDecoderLayer"
