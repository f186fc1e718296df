"""The docs' code blocks run as written."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[2] / "docs"
torch.set_num_threads(1)


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_block(code: str, filename: str, module_name: str, monkeypatch) -> None:
    """Execute as a real module (dataclasses look their module up in sys.modules)."""
    module = types.ModuleType(module_name)
    monkeypatch.setitem(sys.modules, module_name, module)
    exec(compile(code, filename, "exec"), module.__dict__)


@pytest.mark.parametrize("page", ["write-a-pass.md", "binary.md", "byo-model.md", "export.md", "tokens.md",
                                  "report.md", "recipes.md", "lowrank.md"])
def test_doc_examples_run(page, monkeypatch):
    blocks = python_blocks(DOCS / page)
    assert blocks, f"{page} has no python example"
    for index, block in enumerate(blocks):
        run_block(block, str(DOCS / page), f"doc_example_{index}", monkeypatch)


def test_readme_example_runs(monkeypatch):
    (block,) = python_blocks(DOCS.parent / "README.md")
    run_block(block, "README.md", "readme_example", monkeypatch)
