"""merge-tokens: the token-reduction op against independent references, and the pass on three ViTs.

The references here are written from the ToMe paper without the code under
test: per-sample loops and a dense transformation matrix T for bipartite
soft matching, and an eager ToMe forward of each ViT.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxpress
from fxpress.errors import LoweringError, PassError, PipelineError, PreconditionError
from fxpress.ir.verify import verify
from fxpress.passes import NumericCheck, PassContext, PassManager, VerifyAfterPass, parse_pipeline
from fxpress.passes.tokens.merge_tokens import MergeTokens
from fxpress.ops import native_merge as token_kernels
from fxpress.ops import tokens as token_ops
from fxpress.ops.tokens import MERGE_TOKENS, _combine, _kept_tokens, max_merge, r_schedule, reduce_tokens
from fxpress.analysis.attention import find_transformer_blocks

torch.set_num_threads(1)


# -- independent references -------------------------------------------------------------------
def tome_reference(x, metric, size, r, protect_cls=True):
    """Bipartite soft matching, one sample at a time, as a dense T: X' = T(sX) / Ts (float64)."""
    outputs, sizes = [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        r_b = min(r, (n - int(protect_cls)) // 2)
        unit = F.normalize(metric[b].double(), dim=-1)
        a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
        best = []
        for i, token in enumerate(a_set):
            sims = [float(unit[token] @ unit[other]) for other in b_set]
            j = max(range(len(b_set)), key=sims.__getitem__)
            best.append((-math.inf if protect_cls and i == 0 else sims[j], j))
        order = sorted(range(len(a_set)), key=lambda i: -best[i][0])
        merged, unmerged = order[:r_b], order[r_b:]
        if protect_cls:
            unmerged = sorted(unmerged)
        transform = torch.zeros(len(unmerged) + len(b_set), n, dtype=torch.float64)
        for slot, i in enumerate(unmerged):
            transform[slot, a_set[i]] = 1
        for j, token in enumerate(b_set):
            transform[len(unmerged) + j, token] = 1
        for i in merged:
            transform[len(unmerged) + best[i][1], a_set[i]] = 1
        s = torch.ones(n, 1, dtype=torch.float64) if size is None else size[b].double()
        sizes.append(transform @ s)
        outputs.append(transform @ (s * x[b].double()) / sizes[-1])
    return torch.stack(outputs).float(), torch.stack(sizes).float()


def attention(q, k, v, size, prop_attn):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if prop_attn and size is not None:
        logits = logits + size.log().transpose(1, 2)[:, None]
    return logits.softmax(-1) @ v


@torch.no_grad()
def tome_vit_mnist(model, images, removed, prop_attn=True):
    """Eager ToMe forward of the zoo VisionTransformer (merge after attention, before the MLP)."""
    tokens = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(len(tokens), -1, -1), tokens], 1) + model.pos_embed
    size = None
    for block, r in zip(model.blocks, removed):
        b, n, c = x.shape
        qkv = block.attn.qkv(block.norm1(x)).reshape(b, n, 3, block.attn.heads, -1).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], size, prop_attn).transpose(1, 2).reshape(b, n, c)
        x = x + block.attn.proj(out)
        if r:
            x, size = tome_reference(x, qkv[1].mean(1), size, r)
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x)[:, 0])


class HandBlock(nn.Module):
    """Post-norm block, separate q/k/v, logits / sqrt(d); `merge` after the attention residual."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, x, size=None, merge=None, prop_attn=True):
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        x = x + self.o(attention(q, k, v, size, prop_attn).transpose(1, 2).reshape(b, n, c))
        if merge is not None:
            x, size = merge(x, k.mean(1), size)
        x = self.norm1(x)
        return self.norm2(x + self.mlp(x)), size


class HandViT(nn.Module):
    """A hand-written ViT on patch features (B, P, F): CLS + post-norm blocks, no position table."""

    def __init__(self, features=12, dim=24, heads=3, depth=3, classes=5, pool="cls"):
        super().__init__()
        torch.manual_seed(0)
        self.pool = pool
        self.embed, self.cls = nn.Linear(features, dim), nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(HandBlock(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x, removed=None, prop_attn=True):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        size = None
        for i, block in enumerate(self.blocks):
            merge = (lambda t, m, s, r=removed[i]: tome_reference(t, m, s, r)) if removed else None
            x, size = block(x, size, merge, prop_attn)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(1))


class MlpOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) + x)


def hf_vit(attn_implementation="sdpa"):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=64, num_labels=10)
    torch.manual_seed(0)
    return ViTForImageClassification._from_config(config, attn_implementation=attn_implementation).eval()


@pytest.fixture(scope="module")
def vit(zoo_model):
    model = zoo_model("vit-mnist")
    images = fxpress.zoo.load_dataset("mnist-5k", "test").images[:16]
    return model.module, fxpress.capture(model.module, model.example_inputs, dynamic=True), images


@pytest.fixture(scope="module")
def hand():
    model = HandViT().eval()
    return model, fxpress.capture(model, (torch.randn(2, 9, 12),), dynamic={0: {0: "batch", 1: "seq"}})


# -- the op -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,r,protect", [(17, 5, True), (16, 7, True), (12, 3, False), (9, 8, True)])
def test_bipartite_matches_independent_reference_on_random_tokens(tokens, r, protect):
    generator = torch.Generator().manual_seed(tokens + r)
    x, metric = torch.randn(3, tokens, 6, generator=generator), torch.randn(3, tokens, 5, generator=generator)
    size = torch.randint(1, 4, (3, tokens, 1), generator=generator).float()
    for given_size in (None, size):
        merged, sizes = reduce_tokens(x, metric, given_size, r, "bipartite", protect)
        expected, expected_sizes = tome_reference(x, metric, given_size, r, protect)
        assert merged.shape == (3, tokens - min(r, (tokens - protect) // 2), 6)
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sizes, expected_sizes)


def previous_bipartite(x, keys, size, r, protect_cls):
    """The op's bipartite path before it was specialised: max over the A-major score rows, generic `_combine`."""
    r = min(r, (x.shape[1] - int(protect_cls)) // 2)
    metric = functools.reduce(torch.add, keys.unbind(1)) if keys.dim() == 4 else keys  # heads in order
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
    if protect_cls:
        scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unmerged, merged = edge_idx[:, r:], edge_idx[:, :r]
    if protect_cls:
        unmerged = unmerged.sort(dim=1).values
    targets = node_idx.gather(1, merged)
    return _combine(x, size, _kept_tokens(unmerged, x.shape[1]), merged * 2, targets + unmerged.shape[1], None)


@pytest.mark.parametrize("tokens,r,protect,heads", [(50, 15, True, 4), (35, 11, True, 4), (24, 8, True, 1),
                                                    (17, 5, False, 3), (16, 8, False, 0), (9, 4, True, 2)])
def test_bipartite_fast_path_equals_previous_path(tokens, r, protect, heads):
    generator = torch.Generator().manual_seed(tokens * 10 + r)
    x = torch.randn(8, tokens, 16, generator=generator)
    keys = torch.randn(8, tokens, 3, max(heads, 1), 5, generator=generator).permute(2, 0, 3, 1, 4)[1]  # qkv view
    keys = keys[:, 0] if heads == 0 else keys  # (B, N, c) metric
    size = torch.randint(1, 5, (8, tokens, 1), generator=generator).float()
    for given_size in (None, size):
        merged, sizes = reduce_tokens(x, keys, given_size, r, "bipartite", protect)
        expected, expected_sizes = previous_bipartite(x, keys, given_size, r, protect)
        torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sizes, expected_sizes, atol=0, rtol=0)


def torch_only(monkeypatch):
    monkeypatch.setattr(token_ops, "FUSED", False)


@pytest.mark.parametrize("tokens,r,protect,heads,ties", [
    (50, 10, True, 4, True), (50, 15, True, 4, False), (51, 25, True, 0, True), (51, 25, False, 3, False),
    (17, 8, False, 1, False), (17, 0, True, 2, False), (9, 4, True, 0, True), (199, 60, False, 3, True),
    (199, 99, True, 2, False), (2, 1, False, 0, False), (3, 1, True, 0, False)])
def test_fused_bipartite_kernel_equals_torch_path(monkeypatch, tokens, r, protect, heads, ties):
    """The C kernel (token_merge.c) against `_bipartite`, bit for bit: odd N, r = 0 and r at the clamp,
    tied scores (repeated tokens, as MNIST's blank patches give), sizes None or given."""
    if not token_kernels.available():
        pytest.skip("no C compiler: the fused path is not used")
    generator = torch.Generator().manual_seed(tokens * 100 + r)
    x = torch.randn(5, tokens, 24, generator=generator)
    keys = torch.randn(5, *([heads] if heads else []), tokens, 7, generator=generator)
    if ties:  # a run of identical tokens: equal best scores across A tokens
        x[:, 2:tokens // 2], keys[..., 2:tokens // 2, :] = x[:, 2:3], keys[..., 2:3, :]
    size = torch.randint(1, 6, (5, tokens, 1), generator=generator).float()
    unit = token_ops._unit_keys(keys)
    assert r <= max_merge(tokens, protect)
    for given_size in (None, size):
        fused = token_ops._fused_bipartite(x, given_size, unit, r, protect)
        reference = token_ops._bipartite(x, given_size, unit, r, protect)
        for got, want in zip(fused, reference):
            assert got.shape == want.shape and torch.equal(got, want)
        for limit in (r, r + 3):  # through the op, clamping r, against the op with the fused path off
            got = MERGE_TOKENS(x, keys, given_size, limit, "bipartite", protect, 3, 0.1)
            with monkeypatch.context() as patch:
                torch_only(patch)
                want = MERGE_TOKENS(x, keys, given_size, limit, "bipartite", protect, 3, 0.1)
            for a, b in zip(got, want):
                assert torch.equal(a, b)


def test_fused_path_is_skipped_for_grad_float64_and_without_a_compiler(monkeypatch):
    x, keys = torch.randn(2, 11, 4), torch.randn(2, 11, 5)
    calls, fused_built = [], token_kernels.available()
    monkeypatch.setattr(token_ops, "_fused_bipartite", lambda *args: calls.append(args) or token_ops._bipartite(*args))
    reduce_tokens(x, keys, None, 3, "bipartite")
    assert len(calls) == int(token_kernels.available())
    reduce_tokens(x.double(), keys.double(), None, 3, "bipartite")
    reduce_tokens(x.requires_grad_(), keys, None, 3, "bipartite")
    reduce_tokens(x.detach(), keys, None, 3, "transform")
    assert len(calls) == int(token_kernels.available())
    monkeypatch.setattr(token_kernels, "available", lambda: False)  # as after a failed build
    out, _ = reduce_tokens(x.detach(), keys, None, 3, "bipartite")
    assert len(calls) == int(fused_built) and out.shape == (2, 8, 4)


def test_op_r_zero_is_exact_and_heads_average():
    x, keys = torch.randn(2, 9, 4), torch.randn(2, 3, 9, 5)
    out, size = MERGE_TOKENS(x, keys, None, 0, "bipartite", True, 3, 0.1)
    assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 9, 1))
    by_heads, _ = reduce_tokens(x, keys, None, 3, "bipartite")
    torch.testing.assert_close(by_heads, tome_reference(x, keys.mean(1), None, 3)[0])


def test_transform_is_many_to_many_and_keeps_total_mass():
    tokens, r, spread = 11, 4, 3
    probe = torch.eye(tokens)[None]  # token i is e_i: X' shows T's rows directly
    metric = torch.randn(1, tokens, 6, generator=torch.Generator().manual_seed(1))
    out, size = reduce_tokens(probe, metric, None, r, "transform", True, spread, 0.5)
    matrix = out[0] * size[0]  # rows: T_j (sizes undo the normalisation)
    assert out.shape == (1, tokens - r, tokens)
    contributions = (matrix > 1e-6).sum(0)
    assert sorted(contributions.tolist()).count(spread) == r  # each removed token feeds `spread` kept ones
    torch.testing.assert_close(matrix.sum(0), torch.ones(tokens))  # every token's mass lands somewhere
    torch.testing.assert_close(size.sum(), torch.tensor(float(tokens)))
    assert matrix[0, 0] == 1 and (matrix[1:, 0] == 0).all() and (matrix[0, 1:] == 0).all()  # CLS untouched


def test_prune_keeps_the_most_attended_tokens_in_order():
    x = torch.arange(10.0).view(1, 10, 1).repeat(2, 1, 3)
    importance = torch.tensor([[0.0, 5, 1, 4, 2, 3, 9, 0.5, 8, 7]] * 2)
    out, size = reduce_tokens(x, importance, None, 4, "prune")
    assert out[0, :, 0].tolist() == [0, 1, 3, 6, 8, 9] and torch.equal(size, torch.ones(2, 6, 1))


def test_schedules():
    assert r_schedule(8, 4, "constant") == [8, 8, 8, 8]
    assert r_schedule(8, 4, "decreasing") == [12, 9, 6, 4] and sum(r_schedule(8, 4, "decreasing")) <= 32


def test_tvm_without_a_merge_rule_names_the_op(vit, monkeypatch):
    """The rule lives in backends/tvm/token_rules.py (its parity tests: test_tvm_token_rules.py); without it
    the lowering check names the op before TVM runs."""
    from fxpress.backends.tvm import rules, token_rules  # noqa: F401 - token_rules registers the rule

    monkeypatch.delitem(rules._RULES, "fxpress::merge_tokens")
    merged = PassManager("merge-tokens{r=8}").run(vit[1]).graph
    with pytest.raises(LoweringError, match="no TVM lowering rule for op fxpress::merge_tokens"):
        fxpress.compile(merged, "llvm")


def test_onnx_refuses_a_merged_graph_naming_the_op_and_the_target_that_works(vit):
    merged = PassManager("merge-tokens{r=8}").run(vit[1]).graph
    with pytest.raises(LoweringError, match=r"fxpress::merge_tokens at node .*no ONNX form.*'llvm'"):
        fxpress.compile(merged, "onnx")


# -- locating blocks ------------------------------------------------------------------------------
def test_finds_blocks_on_three_vits_and_bert(vit, hand):
    assert [b.path for b in find_transformer_blocks(vit[1])] == [f"blocks.{i}" for i in range(4)]
    assert len(find_transformer_blocks(hand[1])) == 3
    for impl in ("sdpa", "eager"):
        graph = fxpress.capture(hf_vit(impl), (torch.rand(2, 1, 28, 28),))
        blocks = find_transformer_blocks(graph)
        assert [b.path for b in blocks] == [f"model.vit.layers.{i}" for i in range(3)]  # capture wraps HF models
        assert {b.attention.kind for b in blocks} == {"sdpa" if impl == "sdpa" else "softmax"}
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, vocab_size=50)).eval()
    blocks = find_transformer_blocks(fxpress.capture(bert, (torch.randint(0, 50, (2, 7)),)))
    assert [b.path for b in blocks] == ["model.encoder.layer.0", "model.encoder.layer.1"]
    assert all(b.output.target == torch.ops.aten.layer_norm.default for b in blocks)  # post-norm output


def test_model_without_attention_has_nothing_to_do():
    graph = fxpress.capture(MlpOnly(), (torch.randn(2, 8),))
    result = MergeTokens(r=4)(graph, PassContext())
    assert not result.modified and result.graph is graph and "no transformer blocks" in result.stats["reason"]


# -- the pass on vit-mnist -----------------------------------------------------------------------
def test_r_zero_is_exact_on_vit_mnist(vit):
    module, graph, images = vit
    result = MergeTokens(r=0)(graph, PassContext())
    assert not result.modified and "r=0" in result.stats["reason"]
    identity = MergeTokens(r=0, keep_identity=True)(graph, PassContext())
    assert identity.modified and sum(n.target == MERGE_TOKENS for n in identity.graph.fx.nodes) == 3
    assert identity.stats["skipped_blocks"] == [3]  # only CLS is read after the last attention
    with torch.no_grad():
        assert torch.equal(identity.graph(images), module(images))


@pytest.mark.parametrize("r,prop_attn", [(8, True), (11, False)])
def test_merged_vit_mnist_equals_eager_tome(vit, r, prop_attn):
    module, graph, images = vit
    result = MergeTokens(r=r, prop_attn=prop_attn)(graph, PassContext())
    verify(result.graph)
    expected = tome_vit_mnist(module, images, result.stats["r_per_block"], prop_attn)
    torch.testing.assert_close(result.graph(images), expected, atol=1e-4, rtol=1e-4)
    assert result.stats["tokens_mlp"] == {8: [42, 34, 26, 26], 11: [39, 28, 17, 17]}[r]
    assert result.stats["macs_ratio"] < 0.8 and result.graph.num_params == graph.num_params


def test_r_above_half_the_tokens_is_clamped(vit):
    module, graph, images = vit
    result = MergeTokens(r=100)(graph, PassContext())
    assert result.stats["clamped_blocks"] == [0, 1, 2] and result.stats["skipped_blocks"] == [3]
    assert result.stats["tokens_mlp"] == [26, 14, 8, 8] and result.stats["r_per_block"] == [24, 12, 6, 0]
    assert result.graph(images).shape == (16, 10)


@pytest.mark.parametrize("mode", ["transform", "prune"])
def test_modes_and_schedules_through_the_manager(vit, mode):
    module, graph, images = vit
    manager = PassManager(f"merge-tokens{{r=6,mode={mode},schedule=decreasing,spread=2}}",
                          [VerifyAfterPass(), NumericCheck()])
    result = manager.run(graph, PassContext(calibration=[(images,)]))
    (report,) = result.reports
    assert report.stats["r_per_block"] == [9, 7, 5, 0] and report.stats["tokens_mlp"] == [41, 34, 29, 29]
    assert 0.9 < report.error["cosine"] <= 1.0 and report.after["macs"] < report.before["macs"]
    assert str(manager) == (f"merge-tokens{{r=6,mode={mode},schedule=decreasing,protect_cls=true,prop_attn=true,"
                            "spread=2,temperature=0.1,keep_identity=false}")
    assert str(parse_pipeline(str(manager))[0]) == str(manager.passes[0])
    with pytest.raises(PreconditionError, match="already has 3 merge_tokens") as failed:
        PassManager("merge-tokens{r=2}").run(result.graph, PassContext())
    assert failed.value.pass_name == "merge-tokens" and failed.value.ran_before == ()


def test_bad_options_and_unprotected_cls_readout(vit):
    with pytest.raises(PipelineError, match="r must be >= 0"):
        parse_pipeline("merge-tokens{r=-1}")
    with pytest.raises(PipelineError, match="bipartite"):
        parse_pipeline("merge-tokens{mode=random}")
    with pytest.raises(PassError, match="picks token 0"):
        PassManager("merge-tokens{r=4,protect_cls=false}").run(vit[1])


def test_merged_graph_reexports_with_dynamic_batch(vit):
    module, graph, images = vit
    merged = MergeTokens(r=8)(graph, PassContext()).graph
    program = torch.export.export(merged.module, (images[:2],), strict=False,
                                  dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.testing.assert_close(program.module()(images), merged(images))


# -- hand-written and Hugging Face ViTs -------------------------------------------------------------
def test_hand_written_vit_matches_its_own_tome_forward_at_any_length(hand):
    model, graph = hand
    result = MergeTokens(r=2)(graph, PassContext())
    assert result.stats["tokens_mlp"] == [8, 6, 6] and result.stats["skipped_blocks"] == [2]
    _check_any_length(model, result)


def test_mean_pooled_vit_merges_in_every_block():
    model = HandViT(pool="mean").eval()
    graph = fxpress.capture(model, (torch.randn(2, 9, 12),), dynamic={0: {0: "batch", 1: "seq"}})
    result = MergeTokens(r=2)(graph, PassContext())
    assert result.stats["tokens_mlp"] == [8, 6, 4] and result.stats["skipped_blocks"] == []
    _check_any_length(model, result)


def _check_any_length(model, result):
    for patches in (9, 15, 4):  # dynamic sequence length; r is clamped at run time for short inputs
        x = torch.randn(3, patches, 12)
        with torch.no_grad():
            torch.testing.assert_close(result.graph(x), model(x, [2, 2, 2]), atol=1e-5, rtol=1e-5)


def test_hugging_face_vit_sdpa_and_eager_graphs_merge_alike():
    images = torch.rand(4, 1, 28, 28)
    sdpa, eager = hf_vit("sdpa"), hf_vit("eager")
    eager.load_state_dict(sdpa.state_dict())
    results = []
    for model in (sdpa, eager):
        graph = fxpress.capture(model, (images[:2],), dynamic=True)
        identity = MergeTokens(r=0, keep_identity=True)(graph, PassContext()).graph
        with torch.no_grad():
            torch.testing.assert_close(identity(images), model(images).logits, atol=1e-6, rtol=0)  # graph: logits
        result = MergeTokens(r=8)(graph, PassContext())
        assert result.stats["tokens_mlp"] == [42, 34, 34] and result.stats["foreign_inputs"]
        results.append(result.graph(images))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(r=st.integers(0, 6), mode=st.sampled_from(["bipartite", "transform", "prune"]),
       schedule=st.sampled_from(["constant", "decreasing"]))
def test_property_verifies_and_never_grows(hand, r, mode, schedule):
    model, graph = hand
    result = MergeTokens(r=r, mode=mode, schedule=schedule)(graph, PassContext())
    assert result.modified == any(r_schedule(r, 3, schedule)[:2])  # the last block's merge is dead
    if result.modified:
        verify(result.graph)
        assert result.graph.num_params == graph.num_params and result.graph.macs <= graph.macs
        assert result.graph(torch.randn(2, 9, 12)).shape == (2, 5)



class _InputBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
        self.fc, self.norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)

    def forward(self, x):
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, 2, 8).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * 0.3).softmax(-1) @ v
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, tokens, channels))
        return x + self.fc(self.norm(x))


class _StreamIsAnInput(torch.nn.Module):
    """The first block reads a graph input directly, and a second input comes after it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([_InputBlock(), _InputBlock(), _InputBlock()])

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return x[:, 0] + y


def test_initial_sizes_after_the_inputs_when_the_stream_is_an_input():
    graph = fxpress.capture(_StreamIsAnInput().eval(), (torch.randn(2, 11, 16), torch.randn(2, 16)))
    result = PassManager("merge-tokens{r=2},remove-layers{count=1}", [VerifyAfterPass()]).run(graph, PassContext())
    assert [r.modified for r in result.reports] == [True, True]
    kinds = [node.op for node in result.graph.fx.nodes]
    assert kinds.index("call_function") > max(i for i, kind in enumerate(kinds) if kind == "placeholder")
