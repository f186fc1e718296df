"""tail-drop: keep the head of a 1D token sequence; the random tail-drop regularizer and its autoencoder."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxpress
from fxpress.errors import PipelineError, PreconditionError
from fxpress.ir.verify import verify
from fxpress.passes import PassContext, PassManager, VerifyAfterPass, parse_pipeline
from fxpress.passes.tokens.tail_drop import TailDrop
from fxpress.ops.tokens import TAIL_DROP
from fxpress.training.tokens import (AETrainConfig, TokenAEConfig, TokenAutoencoder,
                                            load_token_autoencoders, random_keep, random_tail_drop,
                                            reconstruction_error, train_token_autoencoder)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def autoencoder():
    torch.manual_seed(0)
    model = TokenAutoencoder(TokenAEConfig(tokens=16, token_dim=4, dim=16, heads=2, patch_channels=4)).eval()
    return model, fxpress.capture(model, (torch.rand(2, 1, 28, 28),), dynamic=True)


class SideChannel(nn.Module):
    """A decoder that also reads a per-token tensor computed from the input (cannot be resized)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.side = nn.Linear(6, 8), nn.Linear(6, 8)
        self.decoder = nn.Linear(8, 3)

    def forward(self, x):
        return self.decoder(self.encoder(x) + self.side(x)).mean(1)


class ReadsToken(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.index, self.encoder, self.decoder = index, nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.decoder(self.encoder(x)[:, self.index])


def test_op_is_a_prefix_and_reexports():
    x = torch.randn(3, 10, 4)
    assert torch.equal(TAIL_DROP(x, 4), x[:, :4]) and TAIL_DROP(x, 40).shape == x.shape
    program = torch.export.export(_TailDropModule(), (x,), strict=False,
                                  dynamic_shapes=({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},))
    assert program.module()(torch.randn(2, 7, 4)).shape == (2, 4, 4)


class _TailDropModule(nn.Module):
    def forward(self, x):
        return TAIL_DROP(x, 4) * 2


@pytest.mark.parametrize("keep", [1, 5, 15])
def test_pass_equals_eager_truncation(autoencoder, keep):
    model, graph = autoencoder
    result = TailDrop(keep=keep)(graph, PassContext())
    verify(result.graph)
    images = torch.rand(5, 1, 28, 28)  # another batch size: the graph is generic in batch and tokens
    with torch.no_grad():
        torch.testing.assert_close(result.graph(images), model(images, keep), atol=1e-6, rtol=1e-6)
    assert result.stats["tokens_kept"] == keep and result.stats["size_patches"] >= 2
    assert len(result.stats["foreign_inputs"]) == 1 and result.stats["foreign_inputs"][0].startswith("sliced")
    assert result.graph.num_params == graph.num_params and result.graph.macs < graph.macs


def test_keeping_every_token_has_nothing_to_do(autoencoder):
    _, graph = autoencoder
    result = TailDrop(keep=16)(graph, PassContext())
    assert not result.modified and result.graph is graph and "nothing to drop" in result.stats["reason"]


def test_bad_inputs_are_named(autoencoder):
    _, graph = autoencoder
    with pytest.raises(PreconditionError, match="no node belongs to module 'tokenizer'.*decoder, encoder"):
        TailDrop(keep=4, at="tokenizer")(graph, PassContext())
    with pytest.raises(PipelineError, match="keep must be >= 1"):
        parse_pipeline("tail-drop{keep=0}")
    side = fxpress.capture(SideChannel(), (torch.randn(2, 10, 6),))
    with pytest.raises(PreconditionError, match="reads the input data"):
        TailDrop(keep=4)(side, PassContext())
    reads = fxpress.capture(ReadsToken(7), (torch.randn(2, 10, 6),))
    with pytest.raises(PreconditionError, match="picks token 7"):
        TailDrop(keep=4)(reads, PassContext())
    assert TailDrop(keep=8)(reads, PassContext()).modified  # token 7 is kept: fine


def test_pipeline_text_round_trips(autoencoder):
    _, graph = autoencoder
    manager = PassManager("tail-drop{keep=6,at=encoder}", [VerifyAfterPass()])
    assert str(manager) == "tail-drop{keep=6,at=encoder}"
    assert manager.run(graph).reports[0].stats["tokens_kept"] == 6


@settings(max_examples=6, deadline=None)
@given(keep=st.integers(1, 20))
def test_property_keeps_min_of_keep_and_tokens(autoencoder, keep):
    model, graph = autoencoder
    result = TailDrop(keep=keep)(graph, PassContext())
    assert result.modified == (keep < 16)
    tails = [n for n in result.graph.fx.nodes if n.target == TAIL_DROP]
    assert [result.graph.info(n).shape[1] for n in tails] == ([keep] if keep < 16 else [])


def test_random_tail_drop_draws_every_prefix():
    generator = torch.Generator().manual_seed(0)
    keeps = {random_keep(8, generator, min_keep=2) for _ in range(200)}
    assert keeps == set(range(2, 9))
    assert all(random_keep(8, generator, full_prob=1.0) == 8 for _ in range(10))
    tokens = torch.randn(3, 8, 2)
    dropped = random_tail_drop(tokens, generator)
    assert torch.equal(dropped, tokens[:, :dropped.shape[1]])


def test_training_with_tail_drop_lowers_error():
    images = fxpress.zoo.load_dataset("mnist-5k", "train").images[:256]
    torch.manual_seed(0)
    model = TokenAutoencoder(TokenAEConfig(tokens=8, token_dim=2, dim=16, heads=2, patch_channels=4)).eval()
    before = reconstruction_error(model, images)
    train_token_autoencoder(model, images, AETrainConfig(epochs=3, batch_size=32, full_prob=0.25))
    assert reconstruction_error(model, images) < 0.8 * before


def test_regularized_fixture_error_falls_monotonically_with_kept_tokens():
    models, meta = load_token_autoencoders()
    test = fxpress.zoo.load_dataset("mnist-5k", "test").images
    errors = {}
    for name, model in models.items():
        graph = fxpress.capture(model, (test[:2],), dynamic=True)
        errors[name] = [reconstruction_error(TailDrop(keep=k)(graph, PassContext()).graph, test)
                        for k in range(1, 17)]
        assert errors[name] == pytest.approx(meta["models"][name]["test_mse_by_keep"], abs=1e-5)
    regularized, plain = errors["tail_drop"], errors["plain"]
    assert all(later < earlier for earlier, later in zip(regularized, regularized[1:]))
    assert regularized[0] > 2.5 * regularized[-1]
    assert not all(later < earlier for earlier, later in zip(plain, plain[1:]))  # without it: no ordering
    assert all(r < p for r, p in zip(regularized[:12], plain[:12]))
