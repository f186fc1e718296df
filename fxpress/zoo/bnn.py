"""An XNOR-Net-style binary CNN for sklearn's 8x8 digits.

The first convolution and the classifier stay float; everything between
is binary: :class:`BinaryConv2d` and :class:`BinaryLinear` binarize both
their input activations and their weights to {-1, +1} and rescale the
output per output channel by ``alpha = mean(|W|)`` (XNOR-Net, Rastegari
et al. 2016)::

    y = alpha * (sign(x) (*) sign(W)) + b        (*) = conv or matmul

``sign`` maps ``x >= 0`` to +1 and ``x < 0`` to -1 (never 0), so a bit
``x >= 0`` encodes each value exactly.  The binary convolutions use no
padding, so a bit-packed XNOR/popcount kernel computes them exactly too.
In training, :func:`sign_ste` passes gradients straight through (clipped
to |x| <= 1); in eval mode the modules call the plain :func:`binarize`.

Layout::

    conv     Conv2d(1, 32, 3, padding=1) + bn      float, 8x8
    bconv1   BinaryConv2d(32, 64, 3) + bn1          6x6
    bconv2   BinaryConv2d(64, 64, 3) + bn2          4x4, then max-pool -> 2x2
    bfc      BinaryLinear(256, 128) + bn3
    fc       Linear(128, 10)                        float
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def binarize(x: torch.Tensor) -> torch.Tensor:
    """``+1 where x >= 0 else -1`` (same dtype as ``x``)."""
    signs = torch.where(x >= 0, 1.0, -1.0)
    return signs if signs.dtype == x.dtype else signs.to(x.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """:func:`binarize` forward; straight-through gradient ``1{|x| <= 1}`` backward."""
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (binarize(x) - clipped).detach()


def _sign(x: torch.Tensor, training: bool) -> torch.Tensor:
    return sign_ste(x) if training else binarize(x)


def channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """XNOR-Net scale ``alpha``: mean ``|W|`` per output channel, shape ``(out,)``."""
    return weight.abs().flatten(1).mean(dim=1)


class BinaryConv2d(nn.Conv2d):
    """Conv2d on ``sign(x)`` with weights ``sign(W)``, output scaled by ``alpha``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_bin = _sign(x, self.training)
        w_bin = _sign(self.weight, self.training)
        out = F.conv2d(x_bin, w_bin, None, self.stride, self.padding, self.dilation, self.groups)
        out = out * channel_scale(self.weight).view(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


class BinaryLinear(nn.Linear):
    """Linear on ``sign(x)`` with weights ``sign(W)``, output scaled by ``alpha``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_bin = _sign(x, self.training)
        w_bin = _sign(self.weight, self.training)
        out = F.linear(x_bin, w_bin) * channel_scale(self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out


class BinaryDigitsNet(nn.Module):
    """Binary CNN: digits ``(B, 1, 8, 8)`` in [0, 1] -> logits ``(B, 10)``."""

    def __init__(self, width: int = 32, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.bconv1 = BinaryConv2d(width, 2 * width, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.bconv2 = BinaryConv2d(2 * width, 2 * width, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.bfc = BinaryLinear(2 * width * 4, hidden, bias=False)
        self.bn3 = nn.BatchNorm1d(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(images))
        x = self.bn1(self.bconv1(x))
        x = self.pool(self.bn2(self.bconv2(x)))
        x = self.bn3(self.bfc(x.flatten(1)))
        return self.fc(x)
