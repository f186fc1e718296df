"""Built-in offline models and datasets for trying and testing fxpress.

Models: ``list_models()``, ``load_model(name) -> ZooModel``; your own Hugging Face
model folder or GGUF file: ``from_pretrained(path, task=...) -> ZooModel``.
Datasets: ``list_datasets()``, ``load_dataset(name, split)`` returning an
:class:`ImageDataset`, :class:`TextDataset` or :class:`DepthDataset`;
``text_blocks`` cuts text into token blocks for language models.

Everything is offline and deterministic: weights and data come from the
fixtures shipped in ``fxpress/zoo/fixtures`` or from installed packages.
Heavy dependencies (transformers, sklearn) are imported only when a model
or dataset that needs them is loaded.
"""
from __future__ import annotations

from fxpress.zoo.bnn import BinaryConv2d, BinaryDigitsNet, BinaryLinear, binarize, sign_ste
from fxpress.zoo.cnn import DigitsCNN
from fxpress.zoo.datasets import (
    ImageDataset,
    TextDataset,
    list_datasets,
    load_dataset,
    text_blocks,
)
from fxpress.zoo.gdnet import DepthDataset, GDNetLite
from fxpress.zoo.hf import CausalLMLogits, EncoderHiddenStates, cache_root
from fxpress.zoo.models import ZooModel, describe_models, list_models, load_model
from fxpress.zoo.pretrained import from_pretrained
from fxpress.zoo.vit import ViTConfig, VisionTransformer

__all__ = [
    "BinaryConv2d",
    "BinaryDigitsNet",
    "BinaryLinear",
    "CausalLMLogits",
    "DepthDataset",
    "DigitsCNN",
    "EncoderHiddenStates",
    "GDNetLite",
    "ImageDataset",
    "TextDataset",
    "ViTConfig",
    "VisionTransformer",
    "ZooModel",
    "binarize",
    "cache_root",
    "describe_models",
    "from_pretrained",
    "list_datasets",
    "list_models",
    "load_dataset",
    "load_model",
    "sign_ste",
    "text_blocks",
]
