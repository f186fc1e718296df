"""A small float CNN for sklearn's 8x8 digits, with BatchNorm to fold.

Every convolution and the hidden linear layer are followed by BatchNorm
and ReLU, so a BN-folding pass has something to fuse::

    features.0-2   Conv2d(1, 16, 3, padding=1), BatchNorm2d, ReLU      8x8
    features.3-5   Conv2d(16, 32, 3, padding=1), BatchNorm2d, ReLU     8x8
    features.6     MaxPool2d(2)                                        4x4
    features.7-9   Conv2d(32, 64, 3, padding=1), BatchNorm2d, ReLU     4x4
    features.10    MaxPool2d(2)                                        2x2
    classifier.0-2 Linear(256, 64), BatchNorm1d, ReLU
    classifier.3   Linear(64, 10)

The convolutions and the hidden linear have no bias (BatchNorm follows).
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """``Conv2d(3x3, padding=1, no bias) -> BatchNorm2d -> ReLU``."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class DigitsCNN(nn.Module):
    """Float CNN: digits ``(B, 1, 8, 8)`` in [0, 1] -> logits ``(B, 10)``."""

    def __init__(self, width: int = 16, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(1, width),
            *conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            *conv_bn_relu(2 * width, 4 * width),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(4 * width * 4, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))
