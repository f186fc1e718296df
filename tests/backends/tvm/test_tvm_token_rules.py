"""TVM lowering of the token ops: compiled llvm against eager, every mode, on ties and on vit-mnist.

TVM compiles take seconds, so few models are compiled: one graph that calls the op in every
mode and option on random tokens with exact ties (every mode breaks ties to the lower index, in
both), vit-mnist merged as in the docs, and a tail-dropped autoencoder.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import LoweringError
from fxpress.passes import PassManager
from fxpress.ops.tokens import MERGE_TOKENS, TAIL_DROP
from fxpress.training.tokens import TokenAEConfig, TokenAutoencoder

torch.set_num_threads(1)

# (tokens, r, mode, protect_cls, with size, spread, metric heads: 0 = a (B, N, c) metric)
CASES = [
    (17, 5, "bipartite", True, True, 3, 2),
    (17, 5, "bipartite", False, False, 3, 2),
    (12, 9, "bipartite", True, True, 3, 0),  # r clamped to 5
    (12, 0, "bipartite", True, True, 3, 2),  # identity
    (17, 5, "transform", True, True, 3, 2),
    (12, 4, "transform", False, False, 2, 0),
    (17, 5, "prune", True, True, 3, 2),
    (12, 4, "prune", False, False, 3, 2),
]


class EveryMode(nn.Module):
    """Calls merge_tokens once per CASES entry, plus tail_drop and an add with alpha."""

    def forward(self, x17, keys17, keys12_flat, importance17, size17, x12, keys12, importance12, size12):
        inputs = {17: (x17, keys17, importance17, size17), 12: (x12, keys12, importance12, size12)}
        outputs = []
        for tokens, r, mode, protect, with_size, spread, heads in CASES:
            x, keys, importance, size = inputs[tokens]
            metric = importance if mode == "prune" else keys if heads else keys12_flat
            outputs.extend(MERGE_TOKENS(x, metric, size if with_size else None, r, mode, protect, spread, 0.1))
        outputs += [TAIL_DROP(x17, 6), TAIL_DROP(x12, 40), torch.add(x12, x12 * x12, alpha=0.25)]
        return tuple(outputs)


def tied_inputs() -> tuple[torch.Tensor, ...]:
    """Random tokens whose keys repeat (exact ties in every score) and integer importance (ties)."""
    generator = torch.Generator().manual_seed(0)
    made = []
    for tokens in (17, 12):
        x = torch.randn(3, tokens, 8, generator=generator)
        keys = torch.randn(3, 2, tokens, 5, generator=generator)
        keys[:, :, [6, 8, 10]] = keys[:, :, [4]]  # three A tokens equal to A token 2: tied best matches
        keys[:, :, [7, 9]] = keys[:, :, [5]]  # B tokens equal: tied best B match and tied kept slots
        importance = torch.randint(0, 4, (3, tokens), generator=generator).float()
        size = torch.randint(1, 4, (3, tokens, 1), generator=generator).float()
        made.append((x, keys, importance, size))
    (x17, keys17, importance17, size17), (x12, keys12, importance12, size12) = made
    return x17, keys17, keys12[:, 0].clone(), importance17, size17, x12, keys12, importance12, size12


@pytest.fixture(scope="module")
def every_mode():
    inputs = tied_inputs()
    graph = fxpress.capture(EveryMode(), inputs)
    return fxpress.compile(graph, "llvm"), inputs


@pytest.fixture(scope="module")
def vit(zoo_model):
    model = zoo_model("vit-mnist")
    images = fxpress.zoo.load_dataset("mnist-5k", "test").images[:16]
    return fxpress.capture(model.module, model.example_inputs, dynamic=True), images


def test_every_mode_matches_eager_on_ties(every_mode):
    compiled, inputs = every_mode
    with torch.no_grad():
        expected = EveryMode()(*inputs)
    got = compiled(*inputs)
    assert len(got) == len(expected) == 2 * len(CASES) + 3
    for index, (out, ref) in enumerate(zip(got, expected)):
        case = CASES[index // 2] if index < 2 * len(CASES) else "tail_drop/add"
        assert out.shape == ref.shape, case
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m, case=case: f"{case}: {m}")
    assert got[4].shape == (3, 7, 8) and torch.equal(got[7], inputs[8])  # clamp; r=0 keeps the sizes


def test_bipartite_ties_match_the_unpatched_reference(every_mode):
    """bipartite sorts stably in the reference too: no patching needed."""
    compiled, inputs = every_mode
    with torch.no_grad():
        expected = EveryMode()(*inputs)
    got = compiled(*inputs)
    for index in range(8):  # the four bipartite cases
        torch.testing.assert_close(got[index], expected[index], atol=1e-5, rtol=1e-5)


def test_vit_mnist_merged_decreasing_matches_eager_at_any_batch(vit):
    """The docs' pipeline (prop_attn on: the logits bias is an add with alpha), compiled with a dynamic batch."""
    graph, images = vit
    merged = PassManager("merge-tokens{r=10,schedule=decreasing}").run(graph).graph
    compiled = fxpress.compile(merged, "llvm", dynamic=True)
    for batch in (16, 3):
        with torch.no_grad():
            expected = merged(images[:batch])
        torch.testing.assert_close(compiled(images[:batch]), expected, atol=1e-4, rtol=1e-4)


def test_tail_dropped_autoencoder_matches_eager():
    torch.manual_seed(0)
    model = TokenAutoencoder(TokenAEConfig(tokens=16, token_dim=4, dim=16, heads=2, patch_channels=4)).eval()
    images = torch.rand(4, 1, 28, 28)
    graph = PassManager("tail-drop{keep=6}").run(fxpress.capture(model, (images,))).graph
    with torch.no_grad():
        torch.testing.assert_close(fxpress.compile(graph, "llvm")(images), model(images, 6), atol=1e-5, rtol=1e-5)


class SymbolicR(nn.Module):
    def forward(self, x, keys):
        return MERGE_TOKENS(x, keys, None, x.shape[1] // 4, "bipartite", True, 3, 0.1)[0]


def test_symbolic_r_is_a_lowering_error_naming_the_node():
    x, keys = torch.randn(2, 12, 8), torch.randn(2, 12, 4)
    graph = fxpress.capture(SymbolicR(), (x, keys), dynamic={0: {1: "seq"}, 1: {1: "seq"}})
    with pytest.raises(LoweringError, match=r"merge_tokens.*%merge_tokens.*symbolic r.*dynamic=False"):
        fxpress.compile(graph, "llvm", dynamic=True)
