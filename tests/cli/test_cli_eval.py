"""`fxpress run --eval / --calibration SOURCE / --export-hf`, run as a user would (a real subprocess).

The causal LM is the tiny random LLaMA of tests/eval/tiny_models.py, named as a `file.py:factory` MODEL.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FXPRESS = [sys.executable, "-m", "fxpress.cli"]
TINY_LM = f"{Path(__file__).resolve().parents[1] / 'eval' / 'tiny_models.py'}:tiny_lm_zoo_model"
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
        "that lour'd upon our house in the deep bosom of the ocean buried. ") * 40


def fxpress(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(FXPRESS + ["--threads", "1", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def metric_row(stdout: str, label: str) -> tuple[float, float]:
    """(before, after) of the before/after table's row that starts with `label`."""
    match = re.search(re.escape(label) + r"[^│|]*[│|]\s*([\d.]+)\s*[│|]\s*([\d.]+)", stdout)
    assert match, stdout
    return float(match.group(1)), float(match.group(2))


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "speech.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_eval_and_calibration_from_a_text_file_report_perplexity_before_and_after(text_file):
    result = fxpress("run", TINY_LM, "--pipeline", "remove-layers{count=1}", "--eval", f"text:{text_file}",
                     "--calibration", f"text:{text_file}", "--calibration-batches", "2")
    assert result.returncode == 0, result.stderr
    assert "remove-layers" in result.stdout and "before vs after the pipeline" in result.stdout
    before, after = metric_row(result.stdout, f"perplexity (text:{text_file})")
    assert before > 1 and after > 1 and before != after  # a layer of a random model is gone


def test_eval_default_is_the_models_task_metric():
    result = fxpress("run", "cnn-digits", "--pipeline", "fuse-batchnorm,dce", "--eval", "default",
                     "--eval-items", "100")
    assert result.returncode == 0, result.stderr
    before, after = metric_row(result.stdout, "accuracy (digits test)")
    assert before == after > 0.9  # fuse-batchnorm preserves the model


def test_an_empty_text_file_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert_one_line_error(fxpress("run", TINY_LM, "--pipeline", "dce", "--eval", f"text:{empty}"),
                          "empty.txt is empty")
    assert_one_line_error(fxpress("run", TINY_LM, "--pipeline", "dce", "--calibration", f"text:{empty}"),
                          "empty.txt is empty")


def test_an_unknown_dataset_is_one_line_naming_the_available_ones():
    result = fxpress("run", "cnn-digits", "--pipeline", "dce", "--eval", "wikitext")
    assert_one_line_error(result, "'wikitext'", "mnist-5k", "shakespeare", "stdlib-docs")


def test_an_eval_that_does_not_fit_the_task_is_one_line(text_file):
    assert_one_line_error(fxpress("run", "cnn-digits", "--pipeline", "dce", "--eval", "shakespeare"),
                          "does not fit cnn-digits, a classification model")
    assert_one_line_error(fxpress("run", "cnn-digits", "--pipeline", "dce", "--calibration", f"text:{text_file}"),
                          "calibration data", "does not fit cnn-digits")


def test_export_hf_writes_a_hugging_face_folder(tmp_path):
    out = tmp_path / "hf"
    result = fxpress("run", TINY_LM, "--pipeline", "dce", "--calibration", "1", "--export-hf", str(out))
    assert result.returncode == 0, result.stderr
    assert "exported a Hugging Face model to" in result.stdout
    assert (out / "config.json").is_file()


def test_help_documents_the_eval_and_calibration_flags():
    result = fxpress("run", "--help")
    assert result.returncode == 0
    for flag in ("--eval SPEC", "text:FILE", "--calibration N|SOURCE", "--calibration-batches", "--export-hf"):
        assert flag in result.stdout
