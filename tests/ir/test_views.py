"""Tests for fxpress.ir.views: networkx data-flow and module graphs, node groups, names."""
from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn as nn

from fxpress.ir.capture import capture
from fxpress.ir.views import (INPUTS, OP_KINDS, OUTPUTS, module_graph, module_types, node_groups,
                              target_name, to_networkx, truncate_path)

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + torch.relu(self.fc(self.norm(x)))


class TwoBlocks(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        return self.head(self.blocks(x))


@pytest.fixture(scope="module", params=["export", "symbolic_trace"])
def graph(request):
    torch.manual_seed(0)
    return capture(TwoBlocks(), (torch.randn(3, 8),), method=request.param)


def fx_edges(graph, keep) -> set[tuple[str, str]]:
    return {(source.name, node.name) for node in graph.nodes if keep(node)
            for source in node.all_input_nodes if keep(source)}


def test_to_networkx_matches_fx_graph(graph):
    full = to_networkx(graph, include_params=True)
    assert full.number_of_nodes() == graph.num_nodes
    assert set(full.edges) == fx_edges(graph, lambda n: True)
    view = to_networkx(graph)
    assert view.number_of_nodes() == sum(1 for n in graph.nodes if n.op != "get_attr")
    assert set(view.edges) == fx_edges(graph, lambda n: n.op != "get_attr")
    assert nx.is_directed_acyclic_graph(view)


def test_to_networkx_carries_metadata(graph):
    view = to_networkx(graph)
    order = [name for name, _ in sorted(view.nodes(data="index"), key=lambda item: item[1])]
    assert order == [n.name for n in graph.nodes if n.op != "get_attr"]
    assert sum(macs for _, macs in view.nodes(data="macs")) == graph.macs
    x = view.nodes["x"]
    assert (x["op"], x["shape"], x["dtype"], x["module_path"]) == ("placeholder", (3, 8), "f32", "")
    fc = [attrs for _, attrs in view.nodes(data=True) if attrs["module_path"] == "blocks.0.fc"]
    assert len(fc) == 1 and fc[0]["macs"] == 3 * 8 * 8 and fc[0]["module_type"] == "Linear"


def test_module_graph_links_blocks_in_order(graph):
    modules = module_graph(graph, depth=2)
    assert nx.has_path(modules, "blocks.0", "blocks.1")
    assert modules.has_edge("blocks.0", "blocks.1")
    assert not nx.has_path(modules, "blocks.1", "blocks.0")
    assert modules.has_edge(INPUTS, "blocks.0") and modules.has_edge("head", OUTPUTS)
    assert modules.nodes["blocks.0"]["module_type"] == "Block"
    ops = sum(1 for n in graph.nodes if n.op in OP_KINDS)
    assert sum(count for _, count in modules.nodes(data="nodes")) == ops
    assert sum(macs for _, macs in modules.nodes(data="macs")) == graph.macs


def test_module_graph_at_depth_one(graph):
    modules = module_graph(graph, depth=1)
    assert list(nx.topological_sort(modules)) == [INPUTS, "blocks", "head", OUTPUTS]
    assert modules.edges["blocks", "head"]["tensors"] == 1


def test_node_groups_follow_module_runs(graph):
    groups = node_groups(graph, 2)
    assert [g.path for g in groups] == ["blocks.0", "blocks.1", "head"]
    assert [g.module_type for g in groups] == ["Block", "Block", "Linear"]
    assert sum(g.params for g in groups) == graph.num_params
    assert all(n.op in OP_KINDS for g in groups for n in g.nodes)


def test_module_types_names_every_owner(graph):
    types = module_types(graph)
    assert types[""] == "TwoBlocks"
    assert types["blocks.1"] == "Block" and types["blocks.1.norm"] == "LayerNorm"
    assert list(types) == sorted(types)


def test_target_names_are_short_and_stable(graph):
    names = {target_name(n) for n in graph.nodes}
    if graph.source == "export":
        assert {"aten.linear", "aten.layer_norm", "aten.add.Tensor", "aten.relu"} <= names
    else:
        assert {"blocks.0.fc", "operator.add", "torch.relu"} <= names
    assert not any("0x" in name or "<" in name for name in names)


def test_truncate_path():
    assert truncate_path("blocks.0.mlp.fc1", 2) == "blocks.0"
    assert truncate_path("blocks.0", 5) == "blocks.0"
    assert truncate_path("", 1) == ""
    assert truncate_path("head", None) == "head"
