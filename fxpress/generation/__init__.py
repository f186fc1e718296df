"""Text generation through compressed KV caches (see docs/kv.md).

    from fxpress.generation import Generator
    gen = Generator(fxpress.zoo.load_model("smollm2"), target="eager")
    gen.generate("The king", max_new_tokens=32, policy="snapkv{keep=0.5}+quant{bits=4}")

:mod:`.decoder` is the decoder forward with an explicit cache (the graphs that are captured and
compiled), :mod:`.policy` parses cache policy strings, :mod:`.cache` stores a sequence's cache in its
compressed form and counts its bytes, :mod:`.runtime` runs prefill, scoring and decoding, :mod:`.weights` hands a compressed graph's weights
(quantized linears included) back to the modules generation runs.
"""
from fxpress.generation.cache import CompressedCache
from fxpress.generation.decoder import DecoderStep, GenerationError, check_decoder
from fxpress.generation.policy import CachePolicy, parse_policy
from fxpress.generation.runtime import GenerationResult, Generator, Prefilled, ScoreResult
from fxpress.generation.weights import GraphWeightsError, with_graph_weights

__all__ = ["CachePolicy", "CompressedCache", "DecoderStep", "GenerationError", "GenerationResult", "Generator",
           "GraphWeightsError", "Prefilled", "ScoreResult", "check_decoder", "parse_policy", "with_graph_weights"]
