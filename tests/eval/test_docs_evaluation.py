"""docs/evaluation.md's Python examples run as written (the language-model ones load SmolLM2 / MiniLM: slow)."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"
torch.set_num_threads(1)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def run_block(code: str, name: str, monkeypatch) -> None:
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(code, str(PAGE), "exec"), module.__dict__)


def test_the_page_has_a_classifier_and_a_language_model_example():
    blocks = python_blocks()
    assert len(blocks) == 3
    assert 'load_model("cnn-digits")' in blocks[0] and 'load_model("smollm2")' in blocks[1]


def test_the_classifier_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    run_block(python_blocks()[0], "evaluation_doc_0", monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("index", [1, 2])
def test_the_language_model_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_block(python_blocks()[index], f"evaluation_doc_{index}", monkeypatch)
