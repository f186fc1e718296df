"""A small Vision Transformer for 28x28 MNIST, written in plain torch.

Layout (module paths as later passes see them)::

    patch_embed.proj            Conv2d(1, dim, 4, stride=4): 7x7 = 49 patch tokens
    cls_token, pos_embed        parameters: 1 CLS token + 49 patches = 50 tokens
    blocks.{i}.norm1            LayerNorm
    blocks.{i}.attn.qkv         Linear(dim, 3*dim)
    blocks.{i}.attn.proj        Linear(dim, dim)
    blocks.{i}.norm2            LayerNorm
    blocks.{i}.mlp.fc1          Linear(dim, mlp_ratio*dim), then GELU
    blocks.{i}.mlp.fc2          Linear(mlp_ratio*dim, dim)
    norm, head                  LayerNorm, Linear(dim, classes) on the CLS token

Blocks are pre-norm: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``.
Attention is spelled out (``q @ k^T * scale``, softmax, ``@ v``) instead
of ``F.scaled_dot_product_attention`` so graph passes can find and edit it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of :class:`VisionTransformer` (stored in the fixture JSON)."""

    image_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    num_classes: int = 10

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class PatchEmbed(nn.Module):
    """Image ``(B, C, H, W)`` -> patch tokens ``(B, patches, dim)``."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.dim, config.patch_size, stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: ``proj(softmax(q @ k^T * scale) @ v)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        weights = scores.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with two residual adds."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config.dim, config.heads)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = Mlp(config.dim, config.mlp_ratio * config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """ViT classifier: images ``(B, 1, 28, 28)`` -> logits ``(B, classes)``."""

    def __init__(self, config: ViTConfig = ViTConfig()):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Linear and conv layers keep PyTorch's default init: on 4000 images
        # it trained much faster than the usual ViT trunc_normal(0.02).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(images)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
