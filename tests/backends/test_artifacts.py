"""Saved artifacts: fresh-process load, and clear ArtifactErrors for damaged copies."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fxpress import backends
from fxpress.errors import ArtifactError
from fxpress.ir import capture


@pytest.fixture(scope="module")
def saved(zoo_model, tmp_path_factory):
    """A cnn-digits model compiled for llvm, saved once; tests copy it before damaging it."""
    model = zoo_model("cnn-digits")
    graph = capture(model.module, model.example_inputs, name="cnn-digits")
    folder = backends.compile(graph, "llvm").save(tmp_path_factory.mktemp("art") / "cnn")
    return model, folder


@pytest.fixture()
def copy(saved, tmp_path):
    return shutil.copytree(saved[1], tmp_path / "copy")


def test_fresh_process_load_gives_equal_outputs(saved, tmp_path):
    model, folder = saved
    torch.save(model.example_inputs[0], tmp_path / "x.pt")  # test data only; artifacts never pickle
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from fxpress import backends
        compiled = backends.load({str(folder)!r})
        x = torch.load({str(tmp_path / "x.pt")!r})
        torch.save(compiled(x), {str(tmp_path / "y.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    expected = backends.load(folder)(*model.example_inputs)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_manifest_records_versions_signature_and_hashes(saved):
    manifest = json.loads((saved[1] / "manifest.json").read_text())
    assert manifest["target"] == "llvm" and manifest["backend"] == "tvm"
    assert {"fxpress", "tvm", "torch"} <= set(manifest["versions"])
    assert manifest["inputs"][0]["shape"] == [2, 1, 8, 8] and manifest["inputs"][0]["dtype"] == "float32"
    assert set(manifest["files"]) == {"model.so", "params.safetensors"}
    assert all(len(digest) == 64 for digest in manifest["files"].values())


def test_bad_manifest_json(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        backends.load(copy)


def test_manifest_missing_keys(copy):
    (copy / "manifest.json").write_text(json.dumps({"format": "fxpress-artifact"}))
    with pytest.raises(ArtifactError, match="lacks"):
        backends.load(copy)


def test_missing_library(copy):
    (copy / "model.so").unlink()
    with pytest.raises(ArtifactError, match="missing model.so"):
        backends.load(copy)


def test_truncated_library(copy):
    data = (copy / "model.so").read_bytes()
    (copy / "model.so").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="sha256"):
        backends.load(copy)


def test_tampered_params(copy):
    data = bytearray((copy / "params.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "params.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="params.safetensors does not match"):
        backends.load(copy)


def test_other_tvm_version_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["versions"]["tvm"] = "0.1.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="compiled with tvm 0.1.0"):
        backends.load(copy)


def test_not_a_folder(tmp_path):
    with pytest.raises(ArtifactError, match="not a folder"):
        backends.load(tmp_path / "nowhere")


def test_wrong_input_shape_after_load(saved):
    loaded = backends.load(saved[1])
    with pytest.raises(ArtifactError, match=r"expected float32\[2, 1, 8, 8\], got float32\[2, 1, 9, 9\]"):
        loaded(torch.zeros(2, 1, 9, 9))
