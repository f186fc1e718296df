"""Peer baseline: width pruning of a LLaMA decoder (SmolLM2-135M) with Torch-Pruning's own API.

Torch-Pruning (``torch_pruning`` 1.6.1) builds a dependency graph by tracing the
model, groups coupled channels (``gate_proj``/``up_proj`` outputs with
``down_proj`` inputs; ``q_proj``/``k_proj``/``v_proj`` outputs with ``o_proj``
inputs) and ranks them with a group importance.  This module drives
``tp.pruner.BasePruner`` the way Torch-Pruning's LLM example does, at the
targets fxpress's ``prune-width`` pass uses:

- MLP intermediate ``I -> intermediate`` in every layer (local, per-layer ranking);
- query heads ``H -> heads`` with the KV heads kept (``prune_num_heads=True``,
  ``prune_head_dims=False``: TP removes the same number of query heads from
  every KV group and leaves ``k_proj``/``v_proj`` alone under GQA);
- KV groups ``KV -> kv_heads``: TP does not prune KV heads under GQA, so each
  KV group with its query heads is declared to TP as one "head"
  (``num_heads = KV`` for q, k and v); TP then ranks and removes whole groups,
  its index mapping through ``repeat_kv`` taking the matching ``k_proj`` and
  ``v_proj`` channels with them;
- the hidden size (embedding / residual channels) is kept: ``embed_tokens``
  and ``lm_head`` are ignored layers, which makes the residual group unprunable,
  and the global ratio is 0 (only ``pruning_ratio_dict`` entries prune).

Importance: ``tp.importance.GroupMagnitudeImportance()`` (L2, mean over the
group) or ``tp.importance.GroupTaylorImportance()`` (|w * dL/dw| summed over the
group), the gradients being those of next-token cross-entropy averaged over
the calibration batches.

Workarounds for transformers 5.24 (said once here, in the report too):

1. Tracing the rotary embedding (``rotate_half``: two slices, a negation and a
   concat of the head dimension) sends TP's group search into an endless loop
   (indices grow by ``head_dim/2`` each turn round the slice/concat cycle).
   While TP traces, the model module's ``apply_rotary_pos_emb`` is replaced by
   the identity; rotary mixes dimensions only inside a head, and whole heads
   are what is pruned (``prune_head_dims=False``), so the coupling TP sees is
   the true one.  The real rotary is back before any gradient or evaluation.
2. With ``sdpa`` attention transformers passes un-repeated K/V to SDPA
   (``enable_gqa``), which hides the query-to-KV-head mapping from TP; the
   trace runs with ``eager`` attention (``repeat_kv`` visible), then the
   model's own implementation is restored.
3. ``BasePruner`` keeps mutable default arguments (``num_heads``,
   ``out_channel_groups``) and writes into them; fresh dicts are passed on
   every call.
4. Head pruning only happens in a scope whose width ratio is above 0, so the
   ``q_proj`` of each layer gets a width ratio in ``pruning_ratio_dict``; with
   ``prune_head_dims=False`` no head dimension is removed by it.
5. Two TP bugs in the check made before a group is pruned (details in
   ``_patch_group_check``): duplicated k/v indices after ``repeat_kv`` made
   every KV-group removal fail silently, and a GQA layer pruned to one query
   head per KV group stopped being treated as GQA and was silently skipped.
   The check is wrapped on the pruner's DependencyGraph instance.

Ratios are passed as ``(removed - 0.5) / total`` so TP's ``int``/``ceil``
rounding lands on the exact target counts.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Literal, Sequence

import torch
from torch import nn

Criterion = Literal["magnitude", "taylor"]


def param_count(model: nn.Module) -> int:
    """Number of parameters, a tied embedding counted once."""
    return sum(p.numel() for p in model.parameters())


def _decoder_layers(hf_model: nn.Module) -> list[nn.Module]:
    base = getattr(hf_model, "model", hf_model)
    return list(base.layers)


def _next_token_loss(hf_model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    logits = hf_model(input_ids=input_ids, use_cache=False).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       input_ids[:, 1:].reshape(-1))


@contextlib.contextmanager
def _traceable_attention(hf_model: nn.Module):
    """Eager attention and identity rotary while Torch-Pruning traces (see the module docstring)."""
    layers = _decoder_layers(hf_model)
    modeling = sys.modules[type(layers[0].self_attn).__module__]
    saved_rotary = modeling.apply_rotary_pos_emb
    saved_impl = hf_model.config._attn_implementation
    modeling.apply_rotary_pos_emb = lambda q, k, cos, sin, *args, **kwargs: (q, k)
    hf_model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        modeling.apply_rotary_pos_emb = saved_rotary
        hf_model.config._attn_implementation = saved_impl


def _importance(criterion: Criterion):
    import torch_pruning as tp

    if criterion == "magnitude":
        return tp.importance.GroupMagnitudeImportance()
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"criterion must be 'magnitude' or 'taylor', not {criterion!r}")


def _accumulate_gradients(hf_model: nn.Module, calibration: Sequence[tuple[torch.Tensor, ...]]) -> None:
    hf_model.zero_grad(set_to_none=True)
    for batch in calibration:
        (_next_token_loss(hf_model, batch[0]) / len(calibration)).backward()


def _run_pruner(hf_model: nn.Module, calibration, criterion: Criterion, *, intermediate_ratio: float | None,
                head_ratio: float | None, num_heads: dict,
                keep_kv: set | None = None) -> None:
    """One Torch-Pruning BasePruner step on `hf_model` (in place); `keep_kv`: k/v layers never pruned."""
    import torch_pruning as tp

    layers = _decoder_layers(hf_model)
    pruning_ratio_dict: dict = {}
    head_ratio_dict: dict = {}
    for layer in layers:
        if intermediate_ratio is not None:
            pruning_ratio_dict[layer.mlp.gate_proj] = intermediate_ratio
        if head_ratio is not None:
            # a width ratio > 0 opens the scope in which TP prunes heads; prune_head_dims=False keeps dims
            pruning_ratio_dict[layer.self_attn.q_proj] = head_ratio
            head_ratio_dict[layer.self_attn] = head_ratio
    base = getattr(hf_model, "model", hf_model)
    ignored = [base.embed_tokens]
    if getattr(hf_model, "lm_head", None) is not None:
        ignored.append(hf_model.lm_head)

    importance = _importance(criterion)
    if criterion == "taylor":
        _accumulate_gradients(hf_model, calibration)
    example = calibration[0][0][:1]
    with _traceable_attention(hf_model):
        pruner = tp.pruner.BasePruner(
            hf_model,
            example_inputs=example,
            importance=importance,
            global_pruning=False,
            pruning_ratio=0.0,
            pruning_ratio_dict=pruning_ratio_dict,
            ignored_layers=ignored,
            num_heads=num_heads,
            prune_num_heads=head_ratio is not None,
            prune_head_dims=False,
            head_pruning_ratio=0.0,
            head_pruning_ratio_dict=head_ratio_dict or None,
            in_channel_groups={},
            out_channel_groups={},
            forward_fn=lambda model, ids: model(input_ids=ids, use_cache=False).logits,
            # RMSNorm weights: TP asks for their channel dim (the hidden size, never pruned here)
            unwrapped_parameters=[(p, 0) for p in hf_model.parameters() if p.dim() == 1],
        )
    _patch_group_check(pruner, keep_kv or set())
    pruner.step()
    hf_model.zero_grad(set_to_none=True)


def _patch_group_check(pruner, kv_layers: set) -> None:
    """Work around two TP 1.6.1 bugs in the check made just before a group is pruned.

    1. Duplicated indices: a group rooted at ``o_proj``'s input reaches
       ``k_proj``/``v_proj`` through ``repeat_kv``, where several query heads map
       to one KV head, so their index lists hold every KV channel once per
       query head.  ``check_pruning_group`` compares ``len(idxs)`` with the
       channel count, decides the layer would be emptied and silently drops the
       group: removing whole KV groups never happened.  The indices are
       de-duplicated before the check (pruning removes a set of channels anyway).
    2. In a GQA query-head pass (`kv_layers` given) BasePruner decrements its
       query-head count before re-testing ``_is_gqa``; when the new count equals
       the KV count (one query head left per KV group) the layer no longer looks
       GQA and the removed query heads are mapped onto k/v channels.  The k/v
       entries are emptied, which is what TP itself does for GQA layers.
    """
    check = pruner.DG.check_pruning_group

    def check_without_kv(group) -> bool:
        for i in range(len(group)):
            dep, idxs = group[i]
            if kv_layers and dep.target.module in kv_layers and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                group[i] = (dep, [])
            elif len(set(idxs)) != len(idxs):
                group[i] = (dep, sorted(set(idxs)))
        return check(group)

    pruner.DG.check_pruning_group = check_without_kv


def _sync_config(hf_model: nn.Module, head_dim: int) -> None:
    """Write the pruned shapes back into the config and the attention modules."""
    layers = _decoder_layers(hf_model)
    attn, mlp = layers[0].self_attn, layers[0].mlp
    n_q = attn.q_proj.out_features // head_dim
    n_kv = attn.k_proj.out_features // head_dim
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        if (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features) != (
                n_q * head_dim, n_kv * head_dim, n_kv * head_dim, n_q * head_dim):
            raise RuntimeError(f"Torch-Pruning left layer {a.layer_idx} with uneven attention shapes")
        if m.gate_proj.out_features != mlp.gate_proj.out_features or m.down_proj.in_features != m.up_proj.out_features:
            raise RuntimeError("Torch-Pruning left uneven MLP shapes")
        a.num_key_value_groups = n_q // n_kv
        a.head_dim = head_dim
        if hasattr(m, "intermediate_size"):
            m.intermediate_size = m.gate_proj.out_features
    config = hf_model.config
    config.num_attention_heads = n_q
    config.num_key_value_heads = n_kv
    config.head_dim = head_dim
    config.intermediate_size = mlp.gate_proj.out_features


def prune_smollm2_with_torch_pruning(hf_model: nn.Module, calibration: list[tuple[torch.Tensor, ...]], *,
                                     intermediate: int | None = None, heads: int | None = None,
                                     kv_heads: int | None = None,
                                     criterion: Criterion = "magnitude") -> nn.Module:
    """A width-pruned deep copy of a Hugging Face LLaMA-style causal LM, pruned by Torch-Pruning.

    intermediate: MLP width per layer after pruning (None: keep).
    heads: query heads per layer after pruning (None: keep); the KV heads stay
        and every KV group loses the same number of query heads.
    kv_heads: KV heads per layer after pruning (None: keep); each removed KV head
        takes its query heads with it.  Applied before `heads`.
    criterion: "magnitude" (GroupMagnitudeImportance) or "taylor"
        (GroupTaylorImportance on next-token cross-entropy gradients over `calibration`).
    calibration: batches whose first item is input_ids (B, S).
    The input model is not changed; the copy's config is updated (head_dim kept).
    """
    _importance(criterion)  # validate before copying
    model = copy.deepcopy(hf_model)
    model.eval()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_q, n_kv, width = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size

    if intermediate is not None and not 0 < intermediate <= width:
        raise ValueError(f"intermediate must be in 1..{width}, not {intermediate}")
    if kv_heads is not None and not 0 < kv_heads <= n_kv:
        raise ValueError(f"kv_heads must be in 1..{n_kv}, not {kv_heads}")
    groups_after = kv_heads if kv_heads is not None else n_kv
    q_after_kv = n_q // n_kv * groups_after
    if heads is not None and (not 0 < heads <= q_after_kv or heads % groups_after):
        raise ValueError(f"heads must be a multiple of the {groups_after} KV heads and at most {q_after_kv}, "
                         f"not {heads} (Torch-Pruning removes the same number of query heads in each KV group)")

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)  # TP traces the graph through autograd

    mlp_ratio = (width - intermediate - 0.5) / width if intermediate is not None and intermediate < width else None
    if kv_heads is not None and kv_heads < n_kv:
        # each KV group (its query heads, k and v) is one TP head
        num_heads = {}
        for layer in _decoder_layers(model):
            a = layer.self_attn
            num_heads.update({a.q_proj: n_kv, a.k_proj: n_kv, a.v_proj: n_kv})
        _run_pruner(model, calibration, criterion, intermediate_ratio=mlp_ratio,
                    head_ratio=(n_kv - kv_heads - 0.5) / n_kv, num_heads=num_heads)
        mlp_ratio = None
        _sync_config(model, head_dim)
        n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_ratio = (n_q - heads - 0.5) / n_q if heads is not None and heads < n_q else None
    if head_ratio is not None or mlp_ratio is not None:
        num_heads, kv_layers = {}, set()
        for layer in _decoder_layers(model):
            a = layer.self_attn
            num_heads.update({a.q_proj: n_q, a.k_proj: n_kv, a.v_proj: n_kv})
            kv_layers.update((a.k_proj, a.v_proj))
        _run_pruner(model, calibration, criterion, intermediate_ratio=mlp_ratio, head_ratio=head_ratio,
                    num_heads=num_heads, keep_kv=kv_layers if n_q != n_kv else None)
    _sync_config(model, head_dim)

    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, True))
    return model
