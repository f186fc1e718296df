"""Generation with a compressed graph's weights (`with_graph_weights`): quantized linears and
embeddings run the packed op, eager (the reference op) and TVM (the codes' GEMV) give the same greedy
tokens, trained float tensors come back, an architecture change is refused, the user's model is kept."""
from __future__ import annotations

import json

import pytest
import torch

import fxpress
from fxpress.cli import main
from fxpress.generation import Generator, GraphWeightsError, with_graph_weights
from fxpress.generation.weights import PackedEmbedding, PackedLinear
from fxpress.passes import PassContext, PassManager
from hf_factories import save_tiny, tiny_model

PROMPT = torch.arange(3, 43) * 7 % 500  # 40 tokens, as in test_runtime.py


class Logits(torch.nn.Module):
    """The capture wrapper the zoo uses: its paths carry a ``model.`` prefix."""

    def __init__(self, lm):
        super().__init__()
        self.model = lm

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _compressed(lm, pipeline: str):
    graph = fxpress.capture(Logits(lm), (PROMPT[None, :16],))
    return PassManager(pipeline).run(graph, PassContext()).graph


def test_quantized_weights_decode_alike_eager_export_and_tvm(llama):
    graph = _compressed(llama, "quantize{bits=4,group=16,zero=int,head=true,embed=true}")
    model = with_graph_weights(llama, graph)
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 3 * 7 + 1 and any(isinstance(m, PackedEmbedding) for m in model.modules())
    ids = PROMPT[None, :16]
    with torch.no_grad():  # the modules compute what the graph does, and not what the float model does
        assert torch.allclose(Logits(model)(ids), graph.module(ids), atol=1e-5)
        assert not torch.allclose(Logits(model)(ids), Logits(llama)(ids), atol=1e-5)
    eager = Generator(model).generate(PROMPT, 24, stop_at_eos=False)
    tvm = Generator(model, target="llvm").generate(PROMPT, 24, stop_at_eos=False)
    assert tvm.tokens == eager.tokens and len(eager.tokens) == 24


def test_trained_float_tensors_come_back(llama):
    graph = _compressed(llama, "quantize{bits=4,group=16}")
    norm = next(path for path in graph.referenced_tensors() if path.endswith("layers.0.input_layernorm.weight"))
    owner, _, leaf = norm.rpartition(".")  # a new tensor, as distill or quantized-distill would install
    setattr(graph.module.get_submodule(owner), leaf, torch.nn.Parameter(torch.full_like(graph.attribute(norm), 0.5)))
    model = with_graph_weights(llama, graph)
    assert torch.all(model.model.layers[0].input_layernorm.weight == 0.5)
    assert not torch.all(llama.model.layers[0].input_layernorm.weight == 0.5)  # the user's model is unchanged
    assert isinstance(llama.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_architecture_changes_are_refused(llama):
    graph = _compressed(llama, "remove-layers{count=1,metric=cosine}")
    with pytest.raises(GraphWeightsError, match="no longer reads .* changed the architecture"):
        with_graph_weights(llama, graph)


def test_cli_generate_with_a_pipeline(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "gen.json"
    code = main(["generate", str(folder), "--prompt", "the cat sat on the mat " * 4, "--max-new-tokens", "5",
                 "--pipeline", "quantize{bits=4,group=16,zero=int}", "--calibration", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "quantize{bits=4,group=16,scheme=asym,zero=int" in printed and "changed the graph" in printed
    assert len(json.loads(out.read_text())["tokens"]) == 5
