"""The generation runtime on tiny random decoders: the explicit-cache step equals Hugging Face's forward,
eager, captured and TVM-compiled decoding give the same tokens, bad input gets one clear error."""
from __future__ import annotations

import json

import pytest
import torch

from fxpress.cli import main
from fxpress.generation import DecoderStep, GenerationError, Generator
from hf_factories import save_tiny, tiny_model

PROMPT = torch.arange(3, 43) * 7 % 500  # 40 tokens


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoder_step_equals_the_hf_forward(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        reference = model(ids).logits
        logits, keys, values = DecoderStep(model, prefill=True)(ids, positions)
        assert (logits - reference).abs().max() < 1e-5
        assert keys.shape == (3, 2, 2, 12, 8) and values.shape == keys.shape
        # the last 3 tokens against the first 9 as an explicit past
        chunk = DecoderStep(model)(ids[:, 9:], positions[:, 9:], keys[:, :, :, :9], values[:, :, :, :9])
        assert (chunk[0] - reference[:, 9:]).abs().max() < 1e-5


def test_score_full_matches_the_model_loss(llama):
    gen = Generator(llama)
    context, continuation = PROMPT[:30], PROMPT[30:]
    result = gen.score(gen.prefill(context), continuation, "full")
    with torch.no_grad():
        logits = llama(PROMPT.unsqueeze(0)).logits[0, 29:-1]
    reference = torch.nn.functional.cross_entropy(logits, continuation, reduction="none")
    assert torch.allclose(result.nll, reference, atol=2e-3)
    assert result.kv_bytes_ratio == 1.0


@pytest.mark.parametrize("policy", ["quant{bits=2,window=64}", "snapkv{keep=1.0}", "minicache{gamma=1.0}",
                                    "streaming{window=64}"])
def test_zero_compression_scores_exactly_as_full(llama, policy):
    gen = Generator(llama)
    prefilled = gen.prefill(PROMPT[:30], observe=32)
    full = gen.score(prefilled, PROMPT[30:], "full")
    other = gen.score(prefilled, PROMPT[30:], policy)
    assert torch.equal(full.nll, other.nll)


def test_compression_changes_scores_and_bytes(llama):
    gen = Generator(llama)
    prefilled = gen.prefill(PROMPT[:36], observe=4)
    full = gen.score(prefilled, PROMPT[36:], "full")
    small = gen.score(prefilled, PROMPT[36:], "snapkv{keep=0.5,window=4}+quant{bits=2,group=8,window=0}")
    assert small.kv_bytes_ratio > 3 and not torch.equal(small.nll, full.nll)


@pytest.mark.parametrize("policy", ["full", "snapkv{keep=0.5,window=8}+quant{bits=4,group=8,window=8}",
                                    "minicache{start=1}"])
def test_eager_and_captured_decoding_agree(llama, policy):
    eager = Generator(llama).generate(PROMPT, 12, policy)
    captured = Generator(llama, target="export").generate(PROMPT, 12, policy)
    assert len(eager.tokens) == 12 and eager.tokens == captured.tokens
    assert eager.stored_bytes == captured.stored_bytes and eager.tokens_per_s > 0


def test_tvm_compiled_decode_step_gives_the_same_tokens(llama):
    """64 greedy tokens: the compiled decode step takes the quantized cache as stored (codes, scales,
    minimums, float16 tail) and restores it in the graph; the full cache runs the plain step."""
    policy = "snapkv{keep=0.5,window=8}+quant{kbits=4,vbits=2,group=8,window=0,rotate=true}"
    compiled = Generator(llama, target="llvm")
    prompt = PROMPT[:20]  # 20 + 64 tokens: the body grows from one group to several while decoding
    for name in (policy, "full"):  # the prefill graph that observes serves full too: one compile
        eager = Generator(llama).generate(prompt, 64, name, stop_at_eos=False)
        tvm = compiled.generate(prompt, 64, name, stop_at_eos=False)
        assert tvm.tokens == eager.tokens and tvm.stored_bytes == eager.stored_bytes
        assert tvm.cache_in_graph == (name == policy) and not eager.cache_in_graph


def test_compressed_graph_serves_a_cache_that_starts_empty(llama):
    """A prompt shorter than one key group: the body is a masked stand-in until the first group."""
    policy = "quant{bits=4,group=8,window=8}"
    eager = Generator(llama).generate(PROMPT[:5], 40, policy, stop_at_eos=False)
    captured = Generator(llama, target="export").generate(PROMPT[:5], 40, policy, stop_at_eos=False)
    assert captured.cache_in_graph and captured.tokens == eager.tokens


@pytest.mark.parametrize("arch, message", [("bert", "Encoder-only models"), ("vit", "Encoder-only models"),
                                           ("gemma3", "model type 'gemma3_text' is not supported")])
def test_models_without_a_supported_cache_are_refused(arch, message):
    with pytest.raises(GenerationError, match=message):
        Generator(tiny_model(arch))


def test_bad_generation_input(llama):
    gen = Generator(llama)
    with pytest.raises(GenerationError, match="exceed the model's 128 positions"):
        gen.generate(torch.zeros(120, dtype=torch.long), 16)
    with pytest.raises(GenerationError, match="one non-empty sequence at a time"):
        gen.generate(torch.zeros(2, 5, dtype=torch.long), 4)
    with pytest.raises(GenerationError, match="needs the model's tokenizer"):
        gen.generate("hello", 4)
    with pytest.raises(GenerationError, match="start=5 leaves no pair"):
        gen.generate(PROMPT, 4, "minicache{start=5}")
    with pytest.raises(GenerationError, match="generation target 'cuda'"):
        Generator(llama, target="cuda")


def test_user_model_is_not_changed(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    Generator(llama).generate(PROMPT, 8, "minicache{start=1}+quant{bits=2,group=8,window=8}")
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert not llama.training


def test_cli_generate(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "gen.json"
    code = main(["generate", str(folder), "--prompt", "the cat sat on the mat " * 6, "--cache",
                 "snapkv{keep=0.5,window=8}+quant{bits=4,group=8,window=8}", "--max-new-tokens", "6",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "cache snapkv{keep=0.5,window=8}+quant{bits=4,group=8,window=8}" in printed
    data = json.loads(out.read_text())
    assert len(data["tokens"]) == 6 and data["kv_bytes_ratio"] > 1.5 and "tokens/s" in printed
    assert data["stored_bytes"] < data["full_bytes"]


@pytest.mark.parametrize("args, message", [
    (["--cache", "quant{bits=3}"], "bits=3 is not supported"),
    (["--cache", "snapkv{keep=2}"], "keep=2.0 must lie in (0, 1]"),
])
def test_cli_generate_bad_policy(tmp_path, capsys, args, message):
    code = main(["generate", "missing-model", "--prompt", "x", *args])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_generate_on_an_encoder(tmp_path, capsys):
    folder = save_tiny("bert", tmp_path / "bert")
    code = main(["generate", str(folder), "--prompt", "hello"])
    assert code == 2 and "Encoder-only models" in capsys.readouterr().err
