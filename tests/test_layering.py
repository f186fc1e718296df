"""The package's layers: no import goes up them, and no two packages import each other (in any cycle).

errors, utils, zoo < ir < ops < analysis < passes < backends < eval, export, training, report, generation < recipes < cli.
zoo and utils may import only errors.  Imports inside functions count too: a lazy import up the
layers is still a dependency up the layers.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "fxpress"
LAYERS = [{"errors"}, {"utils", "zoo"}, {"ir"}, {"ops"}, {"analysis"}, {"passes"}, {"backends"},
          {"eval", "export", "training", "report", "generation"}, {"recipes"}, {"cli"}]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}
ONLY_ERRORS = {"zoo", "utils"}


def package_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 or relative.name != "__init__.py" \
        else "__init__"


def imported_packages(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "fxpress" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def import_edges() -> list[tuple[str, str, str]]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = package_of(path)
        if source in ("__init__", "__main__"):
            continue
        for line, target in imported_packages(path):
            if target != source:
                edges.append((source, target, f"{path.relative_to(PACKAGE.parent)}:{line}"))
    return edges


def test_every_package_is_in_a_layer():
    packages = {package_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert packages <= set(RANK), f"packages missing from the layer table: {packages - set(RANK)}"


def test_no_import_goes_up_the_layers():
    upward = [f"{where}: {source} -> {target}" for source, target, where in import_edges()
              if RANK[target] > RANK[source] or (source in ONLY_ERRORS and target != "errors")]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_no_import_cycle_between_packages():
    graph = nx.DiGraph((source, target) for source, target, _ in import_edges())
    cycles = [cycle for cycle in nx.simple_cycles(graph) if len(cycle) > 1]
    assert not cycles, f"package import cycles: {cycles}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The test can fail: an ir module importing passes is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fxpress.passes import PassManager\n")
    assert imported_packages(bad) == [(2, "passes")]
