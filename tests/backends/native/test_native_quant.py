"""Quantized linears on the native target: kernel choice per layout, error bounds, greedy tokens, packed artifacts."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

import fxpress
from fxpress.backends.artifact import CompiledModel, sha256
from fxpress.backends.artifact_check import stored_bytes
from fxpress.backends.native.quant_lowering import OUTPUT_TOLERANCE, NativeQuantLinear, kernel_for, outputs_agree
from fxpress.cli.target_check import check_pipeline_target, source_key, target_table
from fxpress.errors import ArtifactError, PipelineError
from fxpress.ops import native_quant
from fxpress.ops.quant import dequantize, pack_weight, quantize_weight, quantized_linear_reference
from fxpress.passes import PassContext, PassManager, parse_pipeline, registered_passes
from fxpress.passes.infra.targets import check_target
from fxpress.zoo import load_model
from model_factories import tiny_llama, token_batches

torch.set_num_threads(1)


class Mlp(nn.Module):
    def __init__(self, inputs: int = 64, hidden: int = 128, outputs: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(inputs, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def quant_layers(compiled: CompiledModel) -> list[NativeQuantLinear]:
    return [m for m in compiled.executable.program.graph.module.modules() if isinstance(m, NativeQuantLinear)]


def assert_within_kernel_bound(layer: NativeQuantLinear, x: torch.Tensor) -> None:
    """The layer equals the op's reference up to the activation-rounding bound of its kernel."""
    want = quantized_linear_reference(x, layer.codes, layer.scales, layer.zeros, layer.codebook, layer.bias,
                                      layer.bits, layer.group)
    got = layer(x)
    if layer.kernel == "reference":
        assert torch.equal(got, want)
        return
    if layer.kernel == "codebook_linear":  # float activations: float rounding only
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    weight = dequantize(layer.codes, layer.scales, layer.zeros, layer.codebook, layer.bits, layer.group,
                        layer.padded)
    group = layer.group if layer.kernel == "int4_linear" else layer.padded
    padded = torch.nn.functional.pad(x, (0, layer.padded - layer.in_features))
    bound = native_quant.activation_error_bound(padded, weight, group).float()
    assert ((got - want).abs() <= bound + 1e-4 * (1 + want.abs())).all()


@pytest.mark.parametrize("pipeline, kernel", [
    ("quantize{bits=4}", "int4_linear"),
    ("quantize{bits=4,zero=int,group=64}", "int4_linear"),
    ("quantize{bits=4,scheme=sym}", "int4_linear"),
    ("quantize{bits=8,scheme=sym,group=64}", "int8_linear"),  # fc1: one group of K = 64 per row
    ("quantize{bits=8,scheme=sym}", "reference (8-bit with 2 groups per row; the int8 kernel takes one scale per row)"),
    ("quantize{bits=3}", "reference (no native kernel for 3-bit codes)"),
    ("quantize{bits=2,zero=int}", "reference (no native kernel for 2-bit codes)"),
    ("diff-quant{bits=4,steps=2}", "codebook_linear"),
])
def test_each_layout_runs_on_its_kernel_within_the_bound(pipeline, kernel):
    model = Mlp().eval()
    batches = [(torch.randn(8, 64, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    graph = fxpress.capture(model, batches[0])
    quantized = PassManager(pipeline).run(graph, PassContext(calibration=batches)).graph
    compiled = fxpress.compile(quantized, "native")
    assert compiled.info["quantized_kernels"]["fc1"] == kernel
    layer = quant_layers(compiled)[0]
    assert_within_kernel_bound(layer, torch.randn(5, 64))
    eager, native = quantized(*batches[1]), compiled(*batches[1])
    assert outputs_agree(native, eager, compiled.info["quantized_kernels"])
    if all(kernel.startswith("reference") for kernel in compiled.info["quantized_kernels"].values()):
        assert torch.equal(native, eager)


@pytest.mark.parametrize("form", ["sym", "int", "float"])
def test_codebook_forms_and_padded_int4_agree_with_the_reference(form):
    torch.manual_seed(3)
    weight, bias, x = torch.randn(24, 40), torch.randn(24), torch.randn(3, 40)
    plain = quantize_weight(weight, 4, 32, "sym" if form == "sym" else "asym",
                            None if form == "sym" else form, pad=True)  # K = 40 padded to 64
    codebook = torch.sort(torch.randn(16)).values
    with_codebook = pack_weight(plain.unpacked_codes(), plain.scales, plain.zeros, 4, 32, 40, form, codebook)
    for packed, kernel in ((plain, "int4_linear"), (with_codebook, "codebook_linear")):
        planes = dict(packed.tensors, bias=bias)
        name, reason = kernel_for(4, 32, 64, form, packed.codebook is not None, "f32")
        layer = NativeQuantLinear(planes, 4, 32, 40, name, reason)
        assert layer.kernel == kernel
        assert_within_kernel_bound(layer, x)
        assert torch.equal(copy.deepcopy(layer)(x), layer(x))  # a copy rebinds the kernel to its own planes


def greedy(run, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens, each from the last prompt-length window (the graphs have a static sequence length)."""
    tokens, window = prompt, prompt.shape[1]
    for _ in range(steps):
        tokens = torch.cat([tokens, run(tokens[:, -window:])[:, -1:].argmax(-1)], dim=1)
    return tokens[:, window:]


@pytest.fixture(scope="module")
def llama_int4():
    batches = token_batches(2)
    graph = fxpress.capture(tiny_llama(layers=2), batches[0], dynamic=True)
    quantized = PassManager("quantize{bits=4,zero=int}").run(graph, PassContext(calibration=batches)).graph
    return quantized, fxpress.compile(quantized, "native", dynamic=True), batches


def test_tiny_llama_int4_native_keeps_the_eager_greedy_tokens(llama_int4):
    quantized, compiled, batches = llama_int4
    assert set(compiled.info["quantized_kernels"].values()) == {"int4_linear"}
    assert len(compiled.info["quantized_kernels"]) == 14
    eager, native = quantized(*batches[1]), compiled(*batches[1])
    assert outputs_agree(native, eager, compiled.info["quantized_kernels"])
    assert (native - eager).abs().max() <= OUTPUT_TOLERANCE * eager.abs().max()
    assert not torch.equal(native, eager)  # the kernels quantize activations: close, not equal
    prompt = batches[1][0]
    assert torch.equal(greedy(compiled, prompt, 12), greedy(quantized, prompt, 12))
    for batch in token_batches(8, seed=5):  # the random model's decode repeats a token: check every position too
        assert torch.equal(compiled(*batch).argmax(-1), quantized(*batch).argmax(-1))


def saved(compiled: CompiledModel, folder: Path) -> tuple[dict, dict]:
    compiled.save(folder)
    return json.loads((folder / "manifest.json").read_text()), load_file(str(folder / "params.safetensors"))


def test_saved_planes_reload_with_equal_outputs(llama_int4, tmp_path):
    quantized, compiled, batches = llama_int4
    manifest, params = saved(compiled, tmp_path / "llama")
    record = manifest["quantized"]["model.model.layers.0.mlp.down_proj.weight"]
    assert record | {"planes": None} == {"ops": ["linear"], "bits": 4, "group": 32, "zero": "int", "in_features": 64,
                                         "out_features": 32, "planes": None}
    assert {name: (plane["dtype"], plane["shape"]) for name, plane in record["planes"].items()} == {
        "codes": ("uint8", [32, 32]), "scales": ("float32", [32, 2]), "zeros": ("uint8", [32, 2])}
    assert params[record["planes"]["codes"]["name"]].dtype.name == "uint8"
    assert manifest["sizes"]["params.safetensors"] == (tmp_path / "llama" / "params.safetensors").stat().st_size
    reloaded = fxpress.load(tmp_path / "llama")
    assert reloaded.info["quantized_kernels"] == compiled.info["quantized_kernels"]
    for batch in batches:
        assert torch.equal(reloaded(*batch), compiled(*batch))


def test_vit_mnist_int4_artifact_is_small_and_reloads(tmp_path):
    model = load_model("vit-mnist")
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=True)
    quantized = PassManager("quantize{bits=4}").run(graph, PassContext()).graph
    compiled = fxpress.compile(quantized, "native", dynamic=True)
    manifest, _ = saved(compiled, tmp_path / "int4")
    fxpress.compile(graph, "native", dynamic=True).save(tmp_path / "fp32")
    int4 = stored_bytes(tmp_path / "int4" / "params.safetensors")
    fp32 = stored_bytes(tmp_path / "fp32" / "params.safetensors")
    planes = sum(int4[plane["name"]] for record in manifest["quantized"].values()
                 for plane in record["planes"].values())
    weights = sum(fp32[f"parameter:{layer}"] for layer in manifest["quantized"])
    assert len(manifest["quantized"]) == 16 and planes / weights == 0.1875  # g32 float offsets: 6 bits / 32
    images = torch.rand(3, 1, 28, 28)
    assert torch.equal(fxpress.load(tmp_path / "int4")(images), compiled(images))


def rewrite_params(folder: Path, change) -> None:
    params = load_file(str(folder / "params.safetensors"))
    change(params)
    save_file(params, str(folder / "params.safetensors"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["params.safetensors"] = sha256(folder / "params.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_corrupted_manifest_or_plane_gets_one_clear_error(llama_int4, tmp_path):
    _, compiled, _ = llama_int4
    layer = "model.model.layers.1.self_attn.q_proj.weight"
    folder = tmp_path / "model"
    manifest, _ = saved(compiled, folder)
    codes = manifest["quantized"][layer]["planes"]["codes"]["name"]

    def edit_manifest(change):
        saved(compiled, folder)
        data = json.loads((folder / "manifest.json").read_text())
        change(data["quantized"][layer])
        (folder / "manifest.json").write_text(json.dumps(data))

    edit_manifest(lambda record: record["planes"]["codes"].update(dtype="float32"))
    with pytest.raises(ArtifactError, match=f"quantized layer {layer}, plane codes is recorded as float32"):
        fxpress.load(folder)
    edit_manifest(lambda record: record.update(bits=5))
    with pytest.raises(ArtifactError, match=f"quantized layer {layer} has bits=5"):
        fxpress.load(folder)
    edit_manifest(lambda record: record["planes"]["zeros"].update(name="buffer:missing"))
    with pytest.raises(ArtifactError, match=f"quantized layer {layer} lacks plane zeros \\(buffer:missing\\)"):
        fxpress.load(folder)
    saved(compiled, folder)
    rewrite_params(folder, lambda params: params.update({codes: params[codes].astype("float32")}))
    with pytest.raises(ArtifactError, match=f"quantized layer {layer}, plane codes .* is float32"):
        fxpress.load(folder)
    saved(compiled, folder)
    rewrite_params(folder, lambda params: params.update({codes: params[codes][:, :8].copy()}))
    with pytest.raises(ArtifactError, match=f"quantized layer {layer}, plane codes .* is uint8\\[32, 8\\]"):
        fxpress.load(folder)


def test_quantizing_passes_are_accepted_for_native_and_tvm_cpus_and_refused_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_CACHE", str(tmp_path))
    table = target_table()  # the CLI's cached table, keyed by the sources: computed here from these ones
    assert table["key"] == source_key()
    for target in ("native", "llvm", "aarch64"):  # llvm and aarch64: backends/tvm/quant_rules.py
        check_pipeline_target("quantize{bits=4},diff-quant{steps=1},quantized-distill", target)
    with pytest.raises(PipelineError, match="'onnx' cannot lower; targets that can: llvm, aarch64, native"):
        check_pipeline_target("quantize{bits=4}", "onnx")
    for name in ("quantize", "quantized-distill", "diff-quant"):
        check_target([registered_passes()[name]], "native")
        assert not {"native", "llvm", "aarch64"} & set(table["refusals"].get(name, {}))
        for target in ("c", "onnx"):
            with pytest.raises(PipelineError, match=f"pass '{name}' inserts fxpress.quantized_linear, which target "
                                                    f"'{target}' cannot lower; targets that can: llvm, aarch64, "
                                                    "native"):
                check_target(parse_pipeline(name if name != "diff-quant" else "diff-quant{steps=1}"), target)
            assert target in table["refusals"][name]
