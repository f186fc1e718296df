"""Tiny random Hugging Face models of several architectures, saved as users have them: a folder from
`save_pretrained`, with a tokenizer (MiniLM's WordPiece, shipped offline) for the text models."""
from __future__ import annotations

from pathlib import Path

import torch

from fxpress.zoo import packages

TEXT_ARCHITECTURES = ("llama", "qwen2", "gemma3", "bert")
ARCHITECTURES = (*TEXT_ARCHITECTURES, "vit")
VOCAB = 30522  # MiniLM's tokenizer
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128)


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(packages.package_dir(packages.MINILM, "tests") / "model")


def tiny_model(arch: str) -> torch.nn.Module:
    """A random float32 model of `arch` in eval mode (seeded: the same weights every call)."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, **_SMALL))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, **_SMALL))
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(vocab_size=VOCAB, num_key_value_heads=2, head_dim=8,
                                                          sliding_window=16, **_SMALL))
    elif arch == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, **_SMALL), add_pooling_layer=True)
    elif arch == "vit":
        config = tf.ViTConfig(image_size=28, patch_size=7, num_channels=1, num_labels=10, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
        model = tf.ViTForImageClassification(config)
    else:
        raise ValueError(arch)
    return model.float().eval()


def save_tiny(arch: str, folder: Path) -> Path:
    """`tiny_model(arch)` saved with `save_pretrained` (and the tokenizer for text models) into `folder`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for what the tests check
    tiny_model(arch).save_pretrained(folder)
    if arch in TEXT_ARCHITECTURES:
        minilm_tokenizer().save_pretrained(folder)
    return folder
