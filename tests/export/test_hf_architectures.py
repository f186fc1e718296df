"""Hugging Face export across architectures: every pass that keeps a transformers form exports and reloads
with the compressed graph's outputs; the others are refused in one line that points to fxpress artifacts.

Tiny random models (hidden 32, 3 layers, vocab 64) of LLaMA, Qwen2, Gemma3 (text; sliding window 4 on
sequences of 8, so layer types matter), BERT and ViT, each wrapped as capture sees them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import fxpress
from fxpress.errors import ArtifactError
from fxpress.export.hf import export_hf, load_hf
from fxpress.passes import PassContext, PassManager
from fxpress.zoo import CausalLMLogits, EncoderHiddenStates

VOCAB = 64
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


class ImageLogits(torch.nn.Module):
    """``pixel_values -> logits`` of a ViTForImageClassification."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def token_inputs(seed: int) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed)),)


def masked_token_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    (ids,) = token_inputs(seed)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def image_inputs(seed: int) -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),)


def causal_lm(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    return model(input_ids=inputs[0], use_cache=False).logits


def encoder(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    return model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state


def classifier(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    return model(pixel_values=inputs[0]).logits


@dataclass
class Arch:
    model_class: type  # what the folder reloads as
    wrapper: torch.nn.Module  # the captured module (its `model` is the PreTrainedModel)
    inputs: Callable[[int], tuple]
    call: Callable[[torch.nn.Module, tuple], torch.Tensor]  # how the reloaded model gives the graph's output
    graph: fxpress.ir.Graph = None


def build(name: str) -> Arch:
    import transformers as tf

    torch.manual_seed(0)
    if name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, **SMALL))
        arch = Arch(tf.LlamaForCausalLM, CausalLMLogits(model), token_inputs, causal_lm)
    elif name == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, **SMALL))
        arch = Arch(tf.Qwen2ForCausalLM, CausalLMLogits(model), token_inputs, causal_lm)
    elif name == "gemma3":
        config = tf.Gemma3TextConfig(vocab_size=VOCAB, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                     sliding_window_pattern=2, **SMALL)
        arch = Arch(tf.Gemma3ForCausalLM, CausalLMLogits(tf.Gemma3ForCausalLM(config)), token_inputs, causal_lm)
    elif name == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, **SMALL))
        arch = Arch(tf.BertModel, EncoderHiddenStates(model), masked_token_inputs, encoder)
    else:
        config = tf.ViTConfig(image_size=16, patch_size=4, num_labels=5, **SMALL)
        model = tf.ViTForImageClassification(config)
        arch = Arch(tf.ViTForImageClassification, ImageLogits(model), image_inputs, classifier)
    arch.wrapper.eval()
    arch.graph = fxpress.capture(arch.wrapper, arch.inputs(0))
    return arch


@pytest.fixture(scope="module")
def archs():
    cache: dict[str, Arch] = {}

    def get(name: str) -> Arch:
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


def compress(arch: Arch, pipeline: str) -> fxpress.ir.Graph:
    ctx = PassContext(calibration=[arch.inputs(1), arch.inputs(2)], teacher=arch.graph)
    return PassManager(pipeline).run(arch.graph, ctx).graph


def assert_reloads_equal(arch: Arch, graph: fxpress.ir.Graph, folder) -> dict:
    """Export, reload with transformers, compare on fresh inputs; returns config.json."""
    export_hf(graph, arch.wrapper, folder)
    reloaded = load_hf(folder, arch.model_class)
    inputs = arch.inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(arch.call(reloaded, inputs), graph(*inputs), rtol=1e-5, atol=1e-5)
    return json.loads((folder / "config.json").read_text())


ALL = ("llama", "qwen2", "gemma3", "bert", "vit")
HEADS = ("llama", "qwen2", "gemma3", "vit")  # configs that hold a head size of their own (head_dim)
CASES = [
    *[(a, "remove-layers{count=1}") for a in ALL],
    *[(a, "share-weights{group=2}") for a in ALL],
    *[(a, "prune-width{mlp=32}") for a in ALL],
    *[(a, "prune-width{heads=2,mlp=48}") for a in HEADS],
    ("llama", "prune-width{embed=24}"),
    ("qwen2", "prune-width{kv_heads=1,embed=24}"),
    *[(a, "prune-obs{sparsity=0.5,score=magnitude}") for a in ALL],
    *[(a, "fold-constants,fuse-batchnorm,dce") for a in ALL],
    *[(a, "remove-layers{count=1},distill{steps=1,lr=0.001,tail=1}") for a in ("gemma3", "bert", "vit")],
]


@pytest.mark.parametrize(("name", "pipeline"), CASES)
def test_compressed_model_reloads_with_the_graphs_outputs(archs, tmp_path, name, pipeline):
    arch = archs(name)
    graph = compress(arch, pipeline)
    config = assert_reloads_equal(arch, graph, tmp_path)
    original = arch.wrapper.model.config
    layers = 2 if "remove-layers" in pipeline else 3
    assert config["num_hidden_layers"] == layers
    if "mlp=" in pipeline:
        assert config["intermediate_size"] == int(pipeline.split("mlp=")[1].split("}")[0])
    if "heads=2" in pipeline:
        assert config["num_attention_heads"] == 2
    if "embed=24" in pipeline:
        assert config["hidden_size"] == 24 and config["head_dim"] == original.hidden_size // 4
    if "prune-obs" in pipeline:
        from safetensors.torch import load_file

        written = load_file(str(tmp_path / "model.safetensors"))
        block = [t for n, t in written.items() if ".0." in n and t.dim() == 2]
        assert sum(int((t == 0).sum()) for t in block) >= 0.4 * sum(t.numel() for t in block)  # zeros written
    assert "quantization_config" not in config


def test_gemma3_keeps_the_layer_types_of_the_kept_layers(archs, tmp_path):
    arch = archs("gemma3")
    original = list(arch.wrapper.model.config.layer_types)
    assert original == ["sliding_attention", "full_attention", "sliding_attention"]
    graph = compress(arch, "remove-layers{count=1,keep_first=1,keep_last=1}")  # removes layer 1
    config = assert_reloads_equal(arch, graph, tmp_path)
    assert config["layer_types"] == ["sliding_attention", "sliding_attention"]  # not the default pattern
    assert config["sliding_window"] == 4


def refusal(arch: Arch, graph: fxpress.ir.Graph, folder) -> str:
    with pytest.raises(ArtifactError) as caught:
        export_hf(graph, arch.wrapper, folder)
    message = str(caught.value)
    assert "\n" not in message and "save fxpress artifacts instead" in message
    assert "--target llvm --out DIR" in message and "save_weights" in message
    assert not (folder / "config.json").exists()
    return message


@pytest.mark.parametrize(("name", "pipeline", "expected"), [
    ("vit", "merge-tokens{r=2}", r"fxpress\.merge_tokens.* is a fxpress op, made by pass 'merge-tokens' "
                                 r"\(tokens passes\)"),
    ("vit", "binarize", r"fxpress\.binary_linear.* made by pass 'binarize' \(binary passes\)"),
    ("bert", "binarize,xnor-mst", r"fxpress\.binary_linear_mst.* made by pass 'xnor-mst' \(binary passes\)"),
    ("llama", "prune-obs{sparsity=0.9,block=4x1,score=magnitude},sparse-kernels{min_speedup=0.01}",
     r"fxpress\.sparse_linear.* made by pass 'sparse-kernels' \(sparsity passes\)"),
])
def test_custom_ops_are_refused_naming_node_and_pass(archs, tmp_path, name, pipeline, expected):
    arch = archs(name)
    graph = compress(arch, pipeline)
    assert any(n.op == "call_function" and "fxpress" in str(n.target) for n in graph.fx.nodes)
    message = refusal(arch, graph, tmp_path)
    assert message.startswith(f"{type(arch.wrapper).__name__} has no Hugging Face form: node `%")
    assert re.search(expected, message), message


def test_pass_inserted_aten_ops_the_model_never_ran_are_refused(archs, tmp_path):
    from fxpress.ir.builder import copy_provenance

    arch = archs("bert")
    graph = compress(arch, "remove-layers{count=1}").copy()
    node = next(n for n in graph.fx.nodes if n.op == "call_function" and "gelu" in str(n.target))
    with graph.fx.inserting_after(node):
        extra = graph.fx.call_function(torch.ops.aten.abs.default, (node,))
    node.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    copy_provenance(extra, node, "binarize")
    graph.recompile().annotate()
    message = refusal(arch, graph, tmp_path)
    assert "aten.abs.default" in message and "an op the captured model never ran" in message
    assert "made by pass 'binarize' (binary passes)" in message


def test_bert_head_pruning_is_refused(archs, tmp_path):
    arch = archs("bert")
    message = refusal(arch, compress(arch, "prune-width{heads=2}"), tmp_path)
    assert "BertConfig derives the head size from hidden_size / num_attention_heads" in message


def test_a_constant_the_config_recomputes_is_refused(archs, tmp_path):
    """Gemma3 scales embeddings by sqrt(hidden_size): with 24 channels the config says 4.9, the graph 5.66."""
    arch = archs("gemma3")
    message = refusal(arch, compress(arch, "prune-width{embed=24}"), tmp_path)
    assert "differs from CausalLMLogits" in message and "embed_scale is 5.66 in the graph, 4.9 from the config" \
        in message


def test_gguf_quantization_config_is_not_kept(archs, tmp_path, monkeypatch):
    """A model loaded from GGUF carries quantization_config (quant_method gguf); its weights are plain fp32."""
    from transformers.utils.quantization_config import GgufConfig

    arch = archs("llama")
    config = arch.wrapper.model.config
    for settings in (GgufConfig(gguf_file="model.Q4_1.gguf"), {"quant_method": "gguf", "gguf_file": "m.gguf"}):
        monkeypatch.setattr(config, "quantization_config", settings, raising=False)
        folder = tmp_path / type(settings).__name__
        written = assert_reloads_equal(arch, compress(arch, "remove-layers{count=1}"), folder)
        assert "quantization_config" not in written
        assert config.quantization_config is settings  # the source model is left alone


def test_a_bare_pretrained_model_exports_as_capture_wrapped_it(archs, tmp_path):
    """capture wraps a PreTrainedModel itself (paths `model.model.layers...`); export_hf takes the bare model."""
    model = archs("qwen2").wrapper.model
    graph = fxpress.capture(model, token_inputs(0), dynamic=False)
    compressed = PassManager("remove-layers{count=1}").run(graph, PassContext(calibration=[token_inputs(1)])).graph
    export_hf(compressed, model, tmp_path)
    reloaded = load_hf(tmp_path, type(model))
    (ids,) = token_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(causal_lm(reloaded, (ids,)), compressed(ids), rtol=1e-5, atol=1e-5)


def test_a_config_transformers_refuses_is_refused(tmp_path):
    """Gemma3's config requires hidden_size divisible by the heads: 3 heads of 8 beside 32 channels are not."""
    import transformers as tf

    config = tf.Gemma3TextConfig(vocab_size=VOCAB, num_key_value_heads=4, head_dim=8, **SMALL)
    torch.manual_seed(0)
    arch = Arch(tf.Gemma3ForCausalLM, CausalLMLogits(tf.Gemma3ForCausalLM(config)).eval(), token_inputs, causal_lm)
    arch.graph = fxpress.capture(arch.wrapper, arch.inputs(0))
    message = refusal(arch, compress(arch, "prune-width{heads=3}"), tmp_path)
    assert "transformers refuses the compressed Gemma3TextConfig" in message
    assert "not a multiple of the number of attention heads (3)" in message
