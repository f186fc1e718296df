"""Bring your own model, as a user would from the command line: a Hugging Face folder written by
`save_pretrained` (five architectures) goes through `fxpress run DIR --pipeline "remove-layers{count=1}"
--eval ... --export-hf OUT`; the metric is reported before and after, and the exported folder reloads in
transformers with the compressed graph's outputs."""
from __future__ import annotations

import re

import pytest
import torch

import fxpress
from fxpress.cli import main
from fxpress.eval import calibration_batches
from fxpress.passes import PassContext, PassManager
from fxpress.zoo import from_pretrained
from hf_factories import ARCHITECTURES, save_tiny

TEXT = ("The compiler reads the model, finds the blocks that matter least and removes them; then it checks "
        "what the change cost. ") * 30
EVAL = {"llama": "text:{text}", "qwen2": "text:{text}", "gemma3": "text:{text}", "bert": "stdlib-docs",
        "vit": "mnist-5k"}
METRIC = {"llama": "perplexity", "qwen2": "perplexity", "gemma3": "perplexity", "bert": "mrr", "vit": "accuracy"}
PIPELINE = "remove-layers{count=1}"


def _compressed_graph(folder):
    """The same run in Python: capture, the pipeline on the CLI's default calibration."""
    model = from_pretrained(folder)
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims)
    ctx = PassContext(calibration=calibration_batches(model, count=4), teacher=model.module)
    return model, PassManager(PIPELINE).run(graph, ctx).graph


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_run_evaluates_and_exports_a_folder_that_reloads(tmp_path, arch, capsys):
    folder = save_tiny(arch, tmp_path / arch)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "exported"
    spec = EVAL[arch].format(text=text)
    assert main(["run", str(folder), "--pipeline", PIPELINE, "--eval", spec, "--eval-items", "32",
                 "--export-hf", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert re.search(rf"{METRIC[arch]}[^\n]*\d\.\d+[^\n]*\d\.\d+", stdout), stdout
    assert "remove-layers" in stdout and str(out) in stdout.replace("\n", "")

    model, compressed = _compressed_graph(folder)
    reloaded = from_pretrained(out)
    assert reloaded.module.model.config.num_hidden_layers == 2
    with torch.no_grad():
        expected = compressed(*model.example_inputs)
        assert torch.allclose(reloaded.module(*model.example_inputs), expected, atol=1e-5)


@pytest.mark.parametrize("args, expected", [
    (["--task", "translation"], "unknown task 'translation'"),
    (["--eval", "text:{empty}"], "empty"),
])
def test_bad_task_or_empty_text_is_one_line_with_exit_status_2(tmp_path, args, expected, capsys):
    folder = save_tiny("llama", tmp_path / "llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    args = [a.format(empty=empty) for a in args]
    assert main(["run", str(folder), "--pipeline", PIPELINE, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err
