"""Seeded training and evaluation loops for the zoo's small fixtures.

Used by ``scripts/train_*.py``; kept in the package so the tests evaluate
exactly the way the scripts measured the recorded accuracy.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.zoo.datasets import ImageDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and augmentation settings (stored in the fixture JSON).

    The schedule is linear warm-up then cosine decay over all steps;
    augmentation is a random affine map per image (shift in pixels,
    rotation in degrees, scale factor range).
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    max_shift_px: float = 0.0
    max_rotate_deg: float = 0.0
    max_scale: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def random_affine(images: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Shift, rotate and scale each image by a random amount (zero fill)."""
    batch, _, height, width = images.shape
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(config.max_rotate_deg)
    scale = 1 + (torch.rand(batch, generator=generator) * 2 - 1) * config.max_scale
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * config.max_shift_px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin, shift[:, 0] * 2 / width], dim=1),
        torch.stack([sin, cos, shift[:, 1] * 2 / height], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def _augments(config: TrainConfig) -> bool:
    return bool(config.max_shift_px or config.max_rotate_deg or config.max_scale)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train_classifier(model: nn.Module, train: ImageDataset, config: TrainConfig, seed: int) -> float:
    """Train ``model`` in place with AdamW and cross-entropy; return seconds taken."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    start, step = time.perf_counter(), 0
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(train), generator=generator)
        running = 0.0
        for batch in order.split(config.batch_size):
            images, labels = train.images[batch], train.labels[batch]
            if _augments(config):
                images = random_affine(images, config, generator)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, warmup, config.lr)
            loss = F.cross_entropy(model(images), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(batch)
            step += 1
        log.info("epoch %d/%d loss %.4f (%.1f s)", epoch + 1, config.epochs,
                 running / len(train), time.perf_counter() - start)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, dataset: ImageDataset, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``dataset``, in [0, 1]."""
    model.eval()
    correct = 0
    for images, labels in dataset.batches(batch_size):
        correct += int((model(images).argmax(dim=-1) == labels).sum())
    return correct / len(dataset)


def fixture_metadata(model: nn.Module, *, name: str, config: dict, train: TrainConfig, dataset: str,
                     test_accuracy: float, seed: int, threads: int, seconds: float, command: str) -> dict:
    """The JSON record shipped beside a fixture's weights."""
    import platform

    return {
        "model": name,
        "architecture": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": config,
        "train": train.to_dict(),
        "dataset": {"name": dataset, "train_split": "train", "eval_split": "test"},
        "metrics": {"accuracy": round(test_accuracy, 4)},
        "seed": seed,
        "threads": threads,
        "train_seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": command,
    }
