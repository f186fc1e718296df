"""Random tail drop (One-D-Piece) and a small 1D-token autoencoder to train with it.

`random_tail_drop(tokens, generator)` keeps a random prefix of a token
sequence: used as a training-time regularizer it makes an encoder put the
most information in the first tokens, so that the `tail-drop{keep}` pass
can shorten the sequence after training with a graceful loss.

`TokenAutoencoder` is a TiTok-style image tokenizer for MNIST 28x28:

    encoder   4x4 patches (49) + `tokens` learned latent queries -> transformer
              blocks -> the latent outputs, projected to `token_dim`:
              the 1D token sequence (B, tokens, token_dim)
    decoder   49 learned patch queries cross-attend to the (possibly shortened)
              tokens (+ a per-position embedding), one self-attention block,
              then a linear map to the 16 pixels of each patch

`train_token_autoencoder` fits it with MSE, with or without the regularizer.
Under torchrun (`fxpress.utils.distributed`) every process draws the same
minibatches and tail-drop lengths, trains on its rows of each minibatch and
sums the gradients: every process holds the model one process would train.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.utils import distributed

log = logging.getLogger(__name__)


def random_keep(tokens: int, generator: torch.Generator, min_keep: int = 1, full_prob: float = 0.0) -> int:
    """A number of tokens to keep: all of them with probability `full_prob`, else uniform in [min_keep, tokens]."""
    if full_prob > 0 and float(torch.rand((), generator=generator)) < full_prob:
        return tokens
    return int(torch.randint(min_keep, tokens + 1, (1,), generator=generator))


def random_tail_drop(tokens: torch.Tensor, generator: torch.Generator, min_keep: int = 1,
                     full_prob: float = 0.0) -> torch.Tensor:
    """tokens (B, N, ...) -> tokens[:, :k] for one random k (see `random_keep`): One-D-Piece's tail drop."""
    return tokens[:, :random_keep(tokens.shape[1], generator, min_keep, full_prob)]


@dataclass(frozen=True)
class TokenAEConfig:
    """Sizes of a `TokenAutoencoder` (stored in the fixture JSON)."""

    tokens: int = 16
    token_dim: int = 4
    dim: int = 32
    heads: int = 4
    patch_channels: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    """Multi-head attention of queries over keys/values (self-attention when they are the same)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(queries)), self._split(self.k(context)), self._split(self.v(context))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2)
        return self.proj(out.reshape(out.shape[0], out.shape[1], -1))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x), context), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attn(normed, normed if context is None else self.norm_context(context))
        return x + self.mlp(self.norm2(x))


class TokenEncoder(nn.Module):
    """Image (B, 1, 28, 28) -> 1D tokens (B, tokens, token_dim): patch conv, then one linear map to all tokens."""

    def __init__(self, config: TokenAEConfig):
        super().__init__()
        self.tokens, self.token_dim = config.tokens, config.token_dim
        self.patch = nn.Conv2d(1, config.patch_channels, 4, stride=4)
        self.out = nn.Linear(49 * config.patch_channels, config.tokens * config.token_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = F.gelu(self.patch(images)).flatten(1)
        return self.out(features).reshape(-1, self.tokens, self.token_dim)


class TokenDecoder(nn.Module):
    """1D tokens (B, k <= tokens, token_dim) -> image (B, 1, 28, 28)."""

    def __init__(self, config: TokenAEConfig):
        super().__init__()
        self.inp = nn.Linear(config.token_dim, config.dim)
        self.token_pos = nn.Parameter(torch.randn(1, config.tokens, config.dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, 49, config.dim) * 0.02)
        self.cross = Block(config.dim, config.heads)
        self.mix = Block(config.dim, config.heads)
        self.norm = nn.LayerNorm(config.dim)
        self.pixels = nn.Linear(config.dim, 16)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        context = self.inp(tokens) + self.token_pos[:, :tokens.shape[1]]
        x = self.mix(self.cross(self.queries.expand(tokens.shape[0], -1, -1), context))
        patches = self.pixels(self.norm(x)).reshape(-1, 7, 7, 4, 4)
        return torch.sigmoid(patches.permute(0, 1, 3, 2, 4).reshape(-1, 1, 28, 28))


class TokenAutoencoder(nn.Module):
    """`decoder(encoder(images))`; `keep` truncates the token sequence (training-time tail drop)."""

    def __init__(self, config: TokenAEConfig = TokenAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = TokenEncoder(config)
        self.decoder = TokenDecoder(config)

    def forward(self, images: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        tokens = self.encoder(images)
        return self.decoder(tokens if keep is None else tokens[:, :keep])


@dataclass(frozen=True)
class AETrainConfig:
    """Optimiser settings for `train_token_autoencoder` (stored in the fixture JSON)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    tail_drop: bool = True  # random tail drop on every batch
    min_keep: int = 1
    full_prob: float = 0.0  # with tail drop: probability of a batch keeping every token

    def to_dict(self) -> dict:
        return asdict(self)


def train_token_autoencoder(model: TokenAutoencoder, images: torch.Tensor, config: AETrainConfig,
                            seed: int = 0) -> float:
    """Fit `model` in place to reconstruct `images` (MSE, AdamW, cosine LR); return seconds taken."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(images) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps, pct_start=0.05)
    start = time.perf_counter()
    model.train()
    rank, processes = distributed.world()
    for epoch in range(config.epochs):
        running = 0.0
        for batch in torch.randperm(len(images), generator=generator).split(config.batch_size):
            keep = (random_keep(model.config.tokens, generator, config.min_keep, config.full_prob)
                    if config.tail_drop else None)
            mine = batch.tensor_split(processes)[rank]  # this process's rows of the minibatch
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            if len(mine):
                target = images[mine]  # the minibatch's mean: this share's mean weighted by its size
                loss = F.mse_loss(model(target, keep), target) * (len(mine) / len(batch))
                loss.backward()
            distributed.sum_gradients(model.parameters())
            optimizer.step()
            schedule.step()
            running += distributed.sum_floats([loss.item()])[0] * len(batch)
        log.info("epoch %d/%d mse %.5f (%.1f s)", epoch + 1, config.epochs, running / len(images),
                 time.perf_counter() - start)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def reconstruction_error(fn, images: torch.Tensor, batch_size: int = 250) -> float:
    """Mean squared error of fn(images) against images, over all pixels."""
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        total += float(F.mse_loss(fn(batch), batch, reduction="sum"))
    return total / images.numel()


def load_token_autoencoders() -> tuple[dict[str, TokenAutoencoder], dict]:
    """The shipped fixture `tokens-ae`: {"tail_drop": model, "plain": model} (eval mode) and its JSON record."""
    from fxpress.zoo.fixture_io import load_fixture

    state, meta = load_fixture("tokens-ae", "scripts/train_tokens_ae.py")
    config = TokenAEConfig(**meta["config"])
    models = nn.ModuleDict({"tail_drop": TokenAutoencoder(config), "plain": TokenAutoencoder(config)})
    models.load_state_dict(state)
    return {name: model.float().eval() for name, model in models.items()}, meta
