"""Golden-text, determinism, DOT, JSON and dump tests for fxpress.ir.printer.

Regenerate the golden files after an intended change with

    FXPRESS_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/ir/test_printer.py

and read the diff before committing it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import golden
from fxpress.errors import FxpressError
from fxpress.ir.capture import capture
from fxpress.ir.printer import (format_arg, format_graph, format_json, render_dot, to_dot, to_json,
                                write_dump)
from fxpress.ir.views import node_groups

torch.set_num_threads(1)
GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[2]


# -- models ---------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TwoBlockMLP(nn.Module):
    def __init__(self, dim: int = 16, out: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.head = nn.Linear(dim, out)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TinyConvNet(nn.Module):
    """Conv, BatchNorm, a gated split (a multi-output op) and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        a, b = x.chunk(2, dim=1)
        x = (a * torch.sigmoid(b)).mean(dim=(2, 3))
        return self.fc(x)


def mlp_graph(method: str = "export"):
    torch.manual_seed(0)
    return capture(TwoBlockMLP(), (torch.randn(2, 5, 16),), method=method)


def conv_graph(method: str = "export"):
    torch.manual_seed(0)
    return capture(TinyConvNet().eval(), (torch.randn(2, 1, 8, 8),), method=method)


@pytest.fixture(scope="module")
def mlp():
    return mlp_graph()


@pytest.fixture(scope="module")
def conv():
    return conv_graph()


@pytest.fixture(scope="module")
def conv_traced():
    return conv_graph("symbolic_trace")


# -- golden text ----------------------------------------------------------------------------
def check_golden(name: str, text: str) -> None:
    """Compare `text` with the golden file `name` beside this test (tests/golden.py)."""
    golden.check_golden(GOLDEN, name, text)


@pytest.mark.parametrize("name, make, collapse", [
    ("mlp_export.txt", lambda: mlp_graph(), None),
    ("mlp_export_collapse2.txt", lambda: mlp_graph(), 2),
    ("mlp_symbolic_trace.txt", lambda: mlp_graph("symbolic_trace"), None),
    ("conv_export.txt", lambda: conv_graph(), None),
    ("conv_export_collapse1.txt", lambda: conv_graph(), 1),
    ("conv_symbolic_trace.txt", lambda: conv_graph("symbolic_trace"), None),
])
def test_golden_text(name, make, collapse):
    check_golden(name, format_graph(make(), collapse=collapse))


def test_text_has_one_line_per_node(mlp):
    lines = format_graph(mlp).splitlines()
    assert len(lines) == mlp.num_nodes + 1
    assert lines[0].startswith("graph TwoBlockMLP (export): nodes=27 ")
    assert all(line.startswith(("%", "return ")) for line in lines[1:])


def test_show_params_false_hides_parameter_reads(mlp):
    lines = format_graph(mlp, show_params=False).splitlines()
    attrs = sum(1 for n in mlp.nodes if n.op == "get_attr")
    assert len(lines) == mlp.num_nodes - attrs + 1
    assert not any(" = param " in line for line in lines)


def test_text_never_shows_addresses_or_weights(conv_traced, mlp):
    for graph in (conv_traced, mlp):
        text = format_graph(graph) + to_dot(graph) + format_json(graph)
        assert "0x" not in text and " at " not in text
    weight = float(mlp.attribute("blocks.0.fc1.weight")[0, 0].detach())
    assert repr(weight)[:8] not in format_graph(mlp)


def test_collapse_sums_match_graph(mlp):
    groups = node_groups(mlp, 2)
    assert [g.path for g in groups] == ["blocks.0", "blocks.1", "head"]
    assert sum(g.macs for g in groups) == mlp.macs
    assert sum(g.params for g in groups) == mlp.num_params
    with pytest.raises(FxpressError, match="positive"):
        format_graph(mlp, collapse=0)


def test_printing_is_deterministic_across_processes(mlp):
    assert format_graph(mlp) == format_graph(mlp)
    assert format_graph(mlp) == format_graph(mlp_graph())
    script = ("import sys, torch; sys.path.insert(0, 'tests/ir'); import test_printer as t; "
              "from fxpress.ir.printer import format_graph, to_dot, format_json; g = t.mlp_graph(); "
              "sys.stdout.write(format_graph(g) + to_dot(g, collapse=2) + format_json(g))")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout == format_graph(mlp) + to_dot(mlp, collapse=2) + format_json(mlp)


@pytest.mark.parametrize("value, text", [
    (None, "None"), (1e-05, "1e-05"), (True, "True"), ("same", "'same'"), ((1,), "(1,)"),
    ([2, 3], "[2, 3]"), ({"dim": (2, 3)}, "{'dim': (2, 3)}"), (torch.float16, "f16"),
    (torch.device("cpu"), "cpu"), (slice(None, 4, None), "slice(None, 4, None)"), (..., "..."),
    (torch.zeros(2, 3), "tensor(f32[2,3])"), (object(), "<object>"),
])
def test_format_arg(value, text):
    assert format_arg(value) == text


# -- DOT ------------------------------------------------------------------------------------
VERTEX = re.compile(r'^\s*"([^"]+)" \[label=')
EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)";$')


def dot_structure(text: str) -> tuple[set[str], list[tuple[str, str]]]:
    """Declared vertices and edges of DOT text; asserts braces balance outside strings."""
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    depth = 0
    for char in unquoted:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0
    assert depth == 0
    vertices = {m.group(1) for line in text.splitlines() if (m := VERTEX.match(line))}
    edges = [(m.group(1), m.group(2)) for line in text.splitlines() if (m := EDGE.match(line))]
    return vertices, edges


@pytest.mark.parametrize("collapse", [None, 1, 2])
def test_dot_is_well_formed(mlp, collapse):
    text = to_dot(mlp, collapse=collapse)
    vertices, edges = dot_structure(text)
    assert edges and all(a in vertices and b in vertices for a, b in edges)
    assert text.startswith('digraph "TwoBlockMLP" {')
    assert to_dot(mlp, collapse=collapse) == text


def test_dot_clusters_blocks_and_folds_params(mlp):
    text = to_dot(mlp)
    vertices, edges = dot_structure(text)
    assert 'subgraph "cluster_blocks.0" {' in text and 'subgraph "cluster_blocks.1" {' in text
    assert "blocks_0_fc1_weight" not in vertices
    assert "weight: f32[32,16]" in text
    assert ("add", "layer_norm_1") in edges  # block 0 feeds block 1


def test_dot_escapes_quotes_in_names():
    torch.manual_seed(0)
    graph = capture(TwoBlockMLP(), (torch.randn(1, 2, 16),), name='my "mlp" \\ v2')
    dot_structure(to_dot(graph))
    assert to_dot(graph).startswith('digraph "my \\"mlp\\" \\\\ v2" {')


def test_render_dot_without_graphviz(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FxpressError, match="apt-get install graphviz") as caught:
        render_dot("digraph g {}\n", tmp_path / "g.svg")
    assert (tmp_path / "g.dot").read_text() == "digraph g {}\n"
    assert str(tmp_path / "g.dot") in str(caught.value)


def fake_dot(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-dot"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def test_render_dot_runs_graphviz_command(tmp_path, monkeypatch):
    exe = fake_dot(tmp_path, 'echo "$1 $2" > "$4"\n')  # dot -Tsvg IN -o OUT
    monkeypatch.setattr(shutil, "which", lambda name: exe)
    out = render_dot("digraph g {}\n", tmp_path / "dump" / "000_capture.v2", "png")
    assert out == tmp_path / "dump" / "000_capture.v2.png"
    assert out.read_text().strip() == f"-Tpng {tmp_path / 'dump' / '000_capture.v2.dot'}"


def test_render_dot_reports_graphviz_failure(tmp_path, monkeypatch):
    exe = fake_dot(tmp_path, 'echo "syntax error in line 1" >&2\nexit 1\n')
    monkeypatch.setattr(shutil, "which", lambda name: exe)
    with pytest.raises(FxpressError, match="failed .*syntax error in line 1"):
        render_dot("digraph {", tmp_path / "bad.svg")
    with pytest.raises(FxpressError, match="cannot render"):
        render_dot("digraph g {}", tmp_path / "g", "pdf")


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz is not installed: apt-get install graphviz")
@pytest.mark.parametrize("collapse", [None, 2])
def test_render_dot_with_real_graphviz(mlp, tmp_path, collapse):
    out = render_dot(to_dot(mlp, collapse=collapse), tmp_path / "mlp", "svg")
    assert "<svg" in out.read_text()


# -- JSON and dumps -------------------------------------------------------------------------
def test_json_round_trips_and_counts(conv):
    data = json.loads(format_json(conv))
    assert data == to_json(conv)
    assert len(data["nodes"]) == conv.num_nodes
    torch.manual_seed(0)
    assert data["figures"]["params"] == sum(p.numel() for p in TinyConvNet().parameters())
    names = {node["name"] for node in data["nodes"]}
    for node in data["nodes"]:
        assert set(node["users"]) <= names
        for user in node["users"]:
            assert {"node": node["name"]} in _node_refs(next(n for n in data["nodes"] if n["name"] == user))


def _node_refs(record: dict) -> list:
    found, stack = [], [record["args"], record["kwargs"]]
    while stack:
        item = stack.pop()
        if isinstance(item, dict) and set(item) == {"node"}:
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def test_json_records_multi_output_nodes(conv):
    chunk = next(n for n in to_json(conv)["nodes"] if n["name"] == "chunk")
    assert chunk["shape"] == [2, 2, 8, 8]
    assert chunk["extra_outputs"] == [{"dtype": "f32", "shape": [2, 2, 8, 8]}]


def test_write_dump_writes_each_format(mlp, tmp_path):
    paths = write_dump(mlp, tmp_path / "dumps", "000_capture", ("txt", "dot", "json"))
    assert [p.name for p in paths] == ["000_capture.txt", "000_capture.dot", "000_capture.json"]
    assert paths[0].read_text() == format_graph(mlp)
    assert paths[1].read_text() == to_dot(mlp)
    assert json.loads(paths[2].read_text()) == to_json(mlp)
    with pytest.raises(FxpressError, match="unknown dump format"):
        write_dump(mlp, tmp_path, "x", ("txt", "pdf"))


def test_write_dump_without_graphviz_writes_dot_and_warns(mlp, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="fxpress.ir.printer"):
        paths = write_dump(mlp, tmp_path, "001_pass", ("txt", "svg"), collapse=2)
    assert [p.name for p in paths] == ["001_pass.txt", "001_pass.dot"]
    assert not (tmp_path / "001_pass.svg").exists()
    assert "graphviz 'dot' is not installed" in caplog.text
    assert paths[0].read_text() == format_graph(mlp, collapse=2)


# -- properties -----------------------------------------------------------------------------
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(1, 6), min_size=2, max_size=5), relu=st.booleans())
def test_any_mlp_prints_one_line_per_node(widths, relu):
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.Linear(width_in, width_out)] + ([nn.ReLU()] if relu else [])
    model = nn.Sequential(*layers)
    graph = capture(model, (torch.zeros(2, widths[0]),), method="symbolic_trace")
    text = format_graph(graph)
    assert len(text.splitlines()) == graph.num_nodes + 1 and text == format_graph(graph)
    groups = node_groups(graph, 1)
    assert sum(len(g.nodes) for g in groups) == graph.num_nodes - 2  # less input and output
    assert sum(g.params for g in groups) == sum(p.numel() for p in model.parameters())
    assert len(format_graph(graph, collapse=1).splitlines()) == len(groups) + 3
