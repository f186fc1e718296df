"""The `fxpress` command, run as a user would: a real subprocess, one-line errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FXPRESS = [sys.executable, "-m", "fxpress.cli"]


def fxpress(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(FXPRESS + ["--threads", "1", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_passes_lists_every_pass_with_options():
    result = fxpress("passes")
    assert result.returncode == 0, result.stderr
    for name in ("dce", "fold-constants", "fuse-batchnorm"):
        assert name in result.stdout


def test_capture_prints_shapes_and_paths():
    result = fxpress("capture", "cnn-digits")
    assert result.returncode == 0, result.stderr
    assert "f32[2,1,8,8]" in result.stdout
    assert "(equal)" in result.stdout and "max abs error 0" in result.stdout


def test_dump_writes_all_formats(tmp_path):
    result = fxpress("dump", "vit-mnist", "--format", "txt,dot,json", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".dot", ".json", ".txt"]
    assert json.loads((tmp_path / "vit-mnist.json").read_text())["nodes"]
    assert "blocks.0.attn" in (tmp_path / "vit-mnist.txt").read_text()


def test_run_prints_table_and_dumps(tmp_path):
    result = fxpress("run", "cnn-digits", "--pipeline", "fold-constants,fuse-batchnorm,dce",
                     "--dump-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "fuse-batchnorm" in result.stdout and "modified" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_capture.txt", "001_fold-constants.txt", "002_fuse-batchnorm.txt", "003_dce.txt"]
    assert "batch_norm" in (tmp_path / "000_capture.txt").read_text()
    assert "batch_norm" not in (tmp_path / "003_dce.txt").read_text()


@pytest.mark.parametrize("args, fragments", [
    (("capture", "no-such-model"), ("unknown model 'no-such-model'", "vit-mnist")),
    (("run", "cnn-digits", "--pipeline", "dce{x=1}"), ("pass 'dce' has no option 'x'",)),
    (("run", "cnn-digits", "--pipeline", "fuse-batchnrom"), ("did you mean 'fuse-batchnorm'",)),
    (("run", "cnn-digits", "--pipeline", "fold-constants{max_growth=big}"), ("bad value 'big'",)),
    (("run", "cnn-digits", "--pipeline", "dce", "--target", "tpu"), ("unknown target 'tpu'",)),
    (("demo", "--target", "aarch64"), ("use --target llvm, onnx or eager",)),
    (("capture", "missing/file.py:make"), ("does not exist",)),
])
def test_bad_input_gets_one_line_error(args, fragments):
    assert_one_line_error(fxpress(*args), *fragments)


def test_uncapturable_user_model(tmp_path):
    (tmp_path / "branchy.py").write_text(textwrap.dedent("""
        import torch

        class Branchy(torch.nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x * 2
                return x

        def make():
            return Branchy(), (torch.ones(2, 3),)
    """))
    result = fxpress("capture", f"{tmp_path / 'branchy.py'}:make")
    assert_one_line_error(result, "cannot capture branchy:make", "branchy.py:6", "torch.cond")


def test_user_factory_model_runs(tmp_path):
    (tmp_path / "mlp.py").write_text(textwrap.dedent("""
        import torch

        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
            return model, (torch.randn(3, 4),)
    """))
    result = fxpress("run", f"{tmp_path / 'mlp.py'}:make", "--pipeline", "fuse-batchnorm,dce",
                     "--calibration", "0")
    assert result.returncode == 0, result.stderr
    assert "fuse-batchnorm" in result.stdout


def test_run_compiles_saves_and_benches(tmp_path):
    out = tmp_path / "compiled"
    result = fxpress("run", "cnn-digits", "--pipeline", "fuse-batchnorm,dce", "--target", "llvm",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").is_file()
    bench = fxpress("bench", str(out))
    assert bench.returncode == 0, bench.stderr
    assert "median" in bench.stdout and "llvm" in bench.stdout


def test_out_without_target_is_refused(tmp_path):
    assert_one_line_error(fxpress("run", "cnn-digits", "--pipeline", "dce", "--out", str(tmp_path)),
                          "pass --target too")


def test_run_native_target_on_binary_network():
    result = fxpress("run", "bnn-digits", "--pipeline", "binarize,xnor-mst", "--target", "native")
    assert result.returncode == 0, result.stderr
    assert "native: lowered 3 binary layers" in result.stdout and "outputs identical" in result.stdout


def test_run_native_target_on_quantized_vit(tmp_path):
    result = fxpress("run", "vit-mnist", "--pipeline", "quantize{bits=4}", "--target", "native",
                     "--out", str(tmp_path / "q"))
    assert result.returncode == 0, result.stderr
    assert "native: 16 of 16 quantized linears on the C kernels" in result.stdout
    assert "binary layers" not in result.stdout
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert "quantized" in manifest


def test_run_native_target_on_block_sparse_vit():
    result = fxpress("run", "vit-mnist", "--pipeline",
                     "prune-obs{sparsity=0.9,block=4x1,score=magnitude},sparse-kernels", "--target", "native")
    assert result.returncode == 0, result.stderr
    assert "sparse linears run on the sparse C kernel; outputs identical" in result.stdout
    assert "binary layers" not in result.stdout
