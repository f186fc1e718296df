"""The Torch-Pruning peer baseline (benchmarks/peers) on a tiny random LLaMA: shapes, config, exactness, no mutation.

Exactness: removing MLP channels or attention heads equals zeroing, in the dense
model, the matching rows of gate_proj and columns of o_proj; the test finds the
kept channels by matching weight rows and compares logits with that masked copy.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")
pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.peers.torch_pruning_baseline import param_count, prune_smollm2_with_torch_pruning  # noqa: E402

torch.set_num_threads(1)

HIDDEN, INTER, HEADS, KV, LAYERS, VOCAB = 64, 128, 4, 2, 2, 128
HEAD_DIM = HIDDEN // HEADS


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                         num_key_value_heads=KV, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def calibration():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (2, 12), generator=generator),) for _ in range(2)]


def expected_params(inter: int, heads: int, kv: int) -> int:
    embed = VOCAB * HIDDEN * 2  # untied embedding and lm_head
    attn = HIDDEN * HEAD_DIM * (2 * heads + 2 * kv)
    mlp = 3 * HIDDEN * inter
    return embed + HIDDEN + LAYERS * (attn + mlp + 2 * HIDDEN)


def kept_rows(dense: torch.Tensor, pruned: torch.Tensor, block: int) -> list[int]:
    """Indices of the `block`-row blocks of `dense` that survive in `pruned`, in order."""
    blocks = dense.view(-1, block, dense.shape[1])
    kept = []
    for piece in pruned.view(-1, block, pruned.shape[1]):
        matches = [i for i, b in enumerate(blocks) if torch.equal(b, piece)]
        assert len(matches) == 1
        kept.append(matches[0])
    assert kept == sorted(kept)
    return kept


def masked_reference(dense, pruned):
    """The dense model with the removed MLP channels and query heads zeroed."""
    reference = copy.deepcopy(dense)
    for layer, small in zip(reference.model.layers, pruned.model.layers):
        keep = kept_rows(layer.mlp.gate_proj.weight.data, small.mlp.gate_proj.weight.data, 1)
        drop = [i for i in range(INTER) if i not in keep]
        layer.mlp.gate_proj.weight.data[drop] = 0
        keep_q = kept_rows(layer.self_attn.q_proj.weight.data, small.self_attn.q_proj.weight.data, HEAD_DIM)
        for head in range(HEADS):
            if head not in keep_q:
                layer.self_attn.o_proj.weight.data[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
    return reference


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
@pytest.mark.parametrize("inter,heads,kv_heads", [(96, None, None), (None, 2, None), (64, 2, None),
                                                  (None, None, 1), (96, 1, 1)])
def test_prune_tiny_llama(model, calibration, criterion, inter, heads, kv_heads):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    pruned = prune_smollm2_with_torch_pruning(model, calibration, intermediate=inter, heads=heads,
                                              kv_heads=kv_heads, criterion=criterion)
    # the input model is untouched
    assert model.config.to_dict() == config_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    n_kv = kv_heads or KV
    n_q = heads or HEADS // KV * n_kv
    n_inter = inter or INTER
    config = pruned.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.hidden_size) == (n_inter, n_q, n_kv, HEAD_DIM, HIDDEN)
    for layer in pruned.model.layers:
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (n_q * HEAD_DIM, HIDDEN)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (n_kv * HEAD_DIM, HIDDEN)
        assert a.o_proj.weight.shape == (HIDDEN, n_q * HEAD_DIM)
        assert a.num_key_value_groups == n_q // n_kv
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (n_inter, HIDDEN)
        assert m.down_proj.weight.shape == (HIDDEN, n_inter)
        if kv_heads is None:  # GQA query-head pruning keeps every KV head
            assert torch.equal(a.k_proj.weight, model.model.layers[a.layer_idx].self_attn.k_proj.weight)
    assert pruned.model.embed_tokens.weight.shape == (VOCAB, HIDDEN)
    assert param_count(pruned) == expected_params(n_inter, n_q, n_kv)
    assert param_count(model) == expected_params(INTER, HEADS, KV)

    ids = calibration[0][0]
    with torch.no_grad():
        logits = pruned(input_ids=ids, use_cache=False).logits
        assert logits.shape == (2, 12, VOCAB) and torch.isfinite(logits).all()
        if kv_heads is None:
            # each KV head keeps its query heads' pairing: equal to the masked dense model
            expected = masked_reference(model, pruned)(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_kv_group_removal_takes_its_query_heads(model, calibration):
    """Removing a KV head removes the k/v rows and the query heads of that group, nothing else."""
    pruned = prune_smollm2_with_torch_pruning(model, calibration, kv_heads=1, criterion="magnitude")
    group = HEADS // KV
    for layer, small in zip(model.model.layers, pruned.model.layers):
        a, s = layer.self_attn, small.self_attn
        (kept_kv,) = kept_rows(a.k_proj.weight.data, s.k_proj.weight.data, HEAD_DIM)
        assert kept_rows(a.v_proj.weight.data, s.v_proj.weight.data, HEAD_DIM) == [kept_kv]
        assert kept_rows(a.q_proj.weight.data, s.q_proj.weight.data, HEAD_DIM) == list(
            range(kept_kv * group, (kept_kv + 1) * group))
    # equal to the dense model with that group's query heads zeroed
    reference = copy.deepcopy(model)
    for layer, small in zip(reference.model.layers, pruned.model.layers):
        keep = kept_rows(layer.self_attn.q_proj.weight.data, small.self_attn.q_proj.weight.data, HEAD_DIM)
        for head in range(HEADS):
            if head not in keep:
                layer.self_attn.o_proj.weight.data[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
    ids = calibration[1][0]
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids, use_cache=False).logits,
                                   reference(input_ids=ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_bad_targets(model, calibration):
    with pytest.raises(ValueError):
        prune_smollm2_with_torch_pruning(model, calibration, heads=3)  # not a multiple of the 2 KV heads
    with pytest.raises(ValueError):
        prune_smollm2_with_torch_pruning(model, calibration, intermediate=96, criterion="random")
