"""The backend registry: lookups, the can_lower table, the early target check, native as a real target,
and every backend's artifact loaded back through the registry (tampered manifests refused)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import fxpress
from fxpress.backends.registry import backend_for_target, get_backend, registered_backends
from fxpress.errors import ArtifactError, LoweringError, PipelineError
from fxpress.ops.binary import BINARY_OPS, MST_OPS, TRAINABLE_OPS
from fxpress.ops.tokens import MERGE_TOKENS, TAIL_DROP
from fxpress.passes import PassManager, parse_pipeline
from fxpress.passes.infra.targets import check_target, lowering_targets, op_label, targets_that_lower

TARGET_BACKEND = {"llvm": "tvm", "aarch64": "tvm", "c": "tvm", "cuda": "tvm", "onnx": "onnx", "native": "native"}
TOKEN_TARGETS = ["llvm", "aarch64", "c", "cuda"]
BINARY_TARGETS = ["llvm", "aarch64", "native"]


# -- lookups and the can_lower table -----------------------------------------------------------
def test_each_target_has_its_backend():
    assert {name: backend_for_target(name).name for name in TARGET_BACKEND} == TARGET_BACKEND
    assert set(registered_backends()) == {"tvm", "onnx", "native"}
    assert list(lowering_targets()) == list(TARGET_BACKEND)  # registration order: messages list targets so


def test_unknown_backend_and_target_are_clear_errors():
    with pytest.raises(ArtifactError, match="unknown backend 'tpu'"):
        get_backend("tpu")
    with pytest.raises(LoweringError, match="unknown target 'tpu'"):
        backend_for_target("tpu")
    with pytest.raises(PipelineError, match="unknown target 'tpu'"):
        check_target([], "tpu")


@pytest.mark.parametrize("op, able", [(MERGE_TOKENS, TOKEN_TARGETS), (TAIL_DROP, TOKEN_TARGETS)]
                         + [(op, BINARY_TARGETS) for op in BINARY_OPS])
def test_can_lower_table(op, able):
    assert targets_that_lower(op) == able
    assert targets_that_lower(op_label(op).replace(".", "::")) == able  # by qualified name too
    for name, target in lowering_targets().items():
        assert target.can_lower(op) == (name in able), name


def test_every_backend_lowers_aten():
    assert all(target.can_lower(torch.ops.aten.add.Tensor) for target in lowering_targets().values())


def test_versions_name_each_backends_runtime():
    assert {"fxpress", "torch", "tvm"} <= set(get_backend("tvm").versions())
    assert {"fxpress", "torch", "onnxruntime"} <= set(get_backend("onnx").versions())
    assert set(get_backend("native").versions()) == {"fxpress", "torch"}


# -- the early target check ----------------------------------------------------------------------
def test_check_target_names_pass_op_and_able_targets():
    with pytest.raises(PipelineError) as err:
        check_target(parse_pipeline("dce,merge-tokens{r=8}"), "onnx")
    assert str(err.value) == ("pass 'merge-tokens' inserts fxpress.merge_tokens, which target 'onnx' cannot "
                              "lower; targets that can: llvm, aarch64, c, cuda")
    with pytest.raises(PipelineError, match="pass 'binarize' inserts fxpress.binary_.*target 'c' cannot lower; "
                                            "targets that can: llvm, aarch64, native"):
        check_target(parse_pipeline("binarize"), "c")


@pytest.mark.parametrize("pipeline, target", [("merge-tokens{r=8},tail-drop", "cuda"), ("binarize,xnor-mst", "native"),
                                              ("binarize,xnor-mst", "aarch64"), ("fold-constants,dce", "onnx")])
def test_check_target_accepts_what_the_target_lowers(pipeline, target):
    check_target(parse_pipeline(pipeline), target)


def test_passes_declare_what_they_insert():
    classes = fxpress.registered_passes()
    assert set(classes["binarize"].creates) == set(TRAINABLE_OPS)
    assert set(classes["xnor-mst"].creates) == set(MST_OPS)
    assert classes["merge-tokens"].creates == (MERGE_TOKENS,)


# -- native: compile, run, save, load ------------------------------------------------------------
@pytest.fixture(scope="module")
def bnn(zoo_model):
    model = zoo_model("bnn-digits")
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=True, name="bnn-digits")
    return model, PassManager("binarize,xnor-mst").run(graph).graph


@pytest.fixture(scope="module")
def native(bnn):
    return fxpress.compile(bnn[1], "native", dynamic=True)


def test_native_compile_runs_the_kernels_bit_exactly(bnn, native):
    _, graph = bnn
    assert native.backend == "native" and native.target == "native"
    assert native.info["native_layers"] == ["bconv1", "bconv2", "bfc"]
    for batch in (1, 64):
        images = torch.rand(batch, 1, 8, 8)
        assert torch.equal(native(images), graph(images))


def test_native_save_load_round_trip_without_pickle(bnn, native, tmp_path):
    folder = native.save(tmp_path / "bnn")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.json", "params.safetensors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["backend"] == "native" and manifest["library"] == "model.json"
    assert any(name.startswith("parameter:") for name in manifest["param_names"])
    loaded = fxpress.load(folder)
    assert loaded.executable.lowered == ["bconv1", "bconv2", "bfc"] and loaded.inputs == native.inputs
    images = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded(images), bnn[1](images))


def test_native_refuses_tvm_options(bnn):
    with pytest.raises(LoweringError, match="tune_trials apply to TVM targets only"):
        fxpress.compile(bnn[1], "native", tune_trials=4)


# -- every backend's artifact through the registry --------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(zoo_model, native, tmp_path_factory):
    """target -> (saved folder, example inputs, expected outputs), one per backend."""
    model = zoo_model("cnn-digits")
    graph = fxpress.capture(model.module, model.example_inputs, name="cnn-digits")
    root = tmp_path_factory.mktemp("registry")
    saved = {}
    for target in ("llvm", "onnx"):
        compiled = fxpress.compile(graph, target)
        saved[target] = (compiled.save(root / target), model.example_inputs, compiled(*model.example_inputs))
    images = torch.rand(2, 1, 8, 8)
    saved["native"] = (native.save(root / "native"), (images,), native(images))
    return saved


def test_every_backend_has_an_artifact_here(artifacts):
    assert {TARGET_BACKEND[target] for target in artifacts} == set(registered_backends())


@pytest.mark.parametrize("target", ["llvm", "onnx", "native"])
def test_load_through_the_registry(artifacts, target):
    folder, inputs, expected = artifacts[target]
    loaded = fxpress.load(folder)
    assert loaded.backend == TARGET_BACKEND[target] and loaded.target == target
    assert torch.equal(loaded(*inputs), expected)


def _edit_manifest(folder, **changes):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize("target", ["llvm", "onnx", "native"])
def test_unknown_backend_in_manifest_is_refused(artifacts, target, tmp_path):
    copy = shutil.copytree(artifacts[target][0], tmp_path / "copy")
    _edit_manifest(copy, backend="tpu")
    with pytest.raises(ArtifactError, match="unknown backend 'tpu'"):
        fxpress.load(copy)


def test_manifest_claiming_another_backend_is_refused(artifacts, tmp_path):
    copy = shutil.copytree(artifacts["native"][0], tmp_path / "copy")
    _edit_manifest(copy, backend="onnx", target="onnx")
    with pytest.raises(ArtifactError, match="compiled with onnxruntime \\(unrecorded\\)"):
        fxpress.load(copy)


def test_tampered_native_program_is_refused(artifacts, tmp_path):
    copy = shutil.copytree(artifacts["native"][0], tmp_path / "copy")
    text = (copy / "model.json").read_text()
    (copy / "model.json").write_text(text.replace("binary_conv2d", "binary_conv3d", 1))
    with pytest.raises(ArtifactError, match="model.json does not match the sha256"):
        fxpress.load(copy)


def test_other_onnxruntime_version_is_refused(artifacts, tmp_path):
    copy = shutil.copytree(artifacts["onnx"][0], tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    _edit_manifest(copy, versions=manifest["versions"] | {"onnxruntime": "0.1"})
    with pytest.raises(ArtifactError, match="compiled with onnxruntime 0.1"):
        fxpress.load(copy)
