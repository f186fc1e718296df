"""GDNet-lite: RGB-guided x4 depth super-resolution, and the real depth scene it is trained on.

GDNet ("Decoupling Fine Detail and Global Geometry for Compressed Depth
Map Super-Resolution", ECCV 2024 AIM challenge winner) restores a
compressed low-resolution depth map with two encoders: a fine-detail
encoder that takes high-frequency detail from the RGB image, and a global
geometry encoder that suppresses noise by building compact features in a
low-rank space.  Its public repository holds no code or weights, so this
module is a *reconstruction from the paper's description*, sized for a
CPU (38.5k parameters, 83M MACs a tile) and built only from ops
torch.export captures (Conv2d, BatchNorm2d, ReLU, bicubic and bilinear
upsampling, cat, mean)::

    up      = bicubic_x4(lr)                                   the baseline
    centre  = mean(lr);  d = (up - centre) / 1000 mm           per-patch depth, metres
    FDE     image = conv_bn_relu(3 -> w), conv_bn_relu(w -> w)       64x64
            depth = conv_bn_relu(1 -> w)
            2 x   depth = depth + conv_bn_relu([depth, image] -> w)  RGB-guided, dilation 2
    GGE     g = conv_bn_relu(1 -> gw), 2 x conv_bn_relu(gw -> gw)    16x16, on (lr - centre)
            g = Conv1x1(gw -> rank) + BN     the compact low-rank code
            g = conv_bn_relu(1x1, rank -> w), bilinear x4            back to 64x64
    decoder conv_bn_relu([depth, g] -> w), conv_bn_relu(w -> w), Conv(w -> 1)   zero-initialised
    out     = up + 1000 mm * residual

Every convolution but the last is followed by BatchNorm (12 of them), so
``fuse-batchnorm`` has work to do; the last one starts at zero, so
training starts from plain bicubic upsampling.

The scene is the Middlebury 2014 "Motorcycle" pair that scikit-image
ships (``skimage.data.stereo_motorcycle``: left RGB, ground-truth
disparity, down-sampled 4x by scikit-image to 500x741), converted to depth
with its calibration (``Z = f * B / (d + doffs)``, docs/gdnet.md).  The
ground truth is cropped to 500x740 (a multiple of 4); pixels without
ground truth are filled from their nearest valid pixel for the model's
input and never scored.  A vertical strip of columns [448, 640) is held
out: "test" tiles lie inside it, "train" tiles and training crops stay
``GAP`` pixels away from it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import ZooError

SCALE = 4  # super-resolution factor
PATCH = 64  # output tile side; the low-resolution input is PATCH // SCALE
DEPTH_UNIT_MM = 1000.0  # the network works in metres around the patch's mean depth

# Calibration of the down-sampled scene, from skimage.data.stereo_motorcycle's docstring.
FOCAL_PX = 994.978
BASELINE_MM = 193.001
DOFFS_PX = 31.086  # x-difference of the two principal points

HEIGHT, WIDTH = 500, 740  # the scene cropped to multiples of SCALE
HELD_OUT_COLUMNS = (448, 640)  # the "test" strip, [start, stop)
GAP = 16  # training data keeps this many columns away from the strip

# The degradation: 4x4 area mean, Gaussian noise, then quantization (a crude depth codec).
NOISE_MM = 15.0
QUANT_STEP_MM = 25.0
DEGRADE_SEED = 2024  # noise of the fixed train/test tiles; training crops draw fresh noise

DATASET = "motorcycle-depth"
SPLIT_NAMES = ("train", "test", "all")


# -- the scene ------------------------------------------------------------------------------------------------

def disparity_to_depth(disparity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth in mm (``f * B / (d + doffs)``) and the mask of pixels with ground truth (finite disparity)."""
    valid = np.isfinite(disparity)
    depth = np.where(valid, FOCAL_PX * BASELINE_MM / (np.where(valid, disparity, 0.0) + DOFFS_PX), 0.0)
    return depth.astype(np.float32), valid


def fill_invalid(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``depth`` with each pixel lacking ground truth set to its nearest valid pixel's depth."""
    from scipy import ndimage

    _, (rows, cols) = ndimage.distance_transform_edt(~valid, return_indices=True)
    return depth[rows, cols]


@dataclass(frozen=True)
class DepthScene:
    """The whole scene: ``rgb`` (3, H, W) in [0, 1], ``depth`` (1, H, W) in mm (filled), ``valid`` (1, H, W)."""

    rgb: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor


@functools.lru_cache(maxsize=1)
def load_scene() -> DepthScene:
    """The Middlebury Motorcycle scene from scikit-image, as depth in mm (see module doc)."""
    try:
        from skimage import data
    except ImportError as err:
        raise ZooError(f"dataset '{DATASET}' needs scikit-image: run `pip install scikit-image==0.26.0`") from err
    left, _, disparity = data.stereo_motorcycle()
    depth, valid = disparity_to_depth(disparity[:HEIGHT, :WIDTH])
    rgb = left[:HEIGHT, :WIDTH].astype(np.float32) / 255.0
    return DepthScene(rgb=torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
                      depth=torch.from_numpy(fill_invalid(depth, valid))[None].contiguous(),
                      valid=torch.from_numpy(valid)[None].contiguous())


# -- degradation ----------------------------------------------------------------------------------------------

def area_downsample(depth: torch.Tensor) -> torch.Tensor:
    """The mean of every SCALE x SCALE block: (..., H, W) -> (..., H / SCALE, W / SCALE)."""
    return F.avg_pool2d(depth, SCALE)


def degrade(clean_lr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noisy, quantized low-resolution depth: ``round((x + N(0, NOISE_MM)) / step) * step``."""
    noise = torch.randn(clean_lr.shape, generator=generator) * NOISE_MM
    return torch.round((clean_lr + noise) / QUANT_STEP_MM) * QUANT_STEP_MM


@functools.lru_cache(maxsize=1)
def clean_scene_lr() -> torch.Tensor:
    """The whole scene's low-resolution depth before noise and quantization (1, H / SCALE, W / SCALE)."""
    return area_downsample(load_scene().depth[None])[0]


@functools.lru_cache(maxsize=1)
def degraded_scene_lr() -> torch.Tensor:
    """The whole scene's degraded low-resolution depth (1, H / SCALE, W / SCALE), noise seeded DEGRADE_SEED."""
    return degrade(clean_scene_lr(), torch.Generator().manual_seed(DEGRADE_SEED))


# -- tiles and splits -----------------------------------------------------------------------------------------

def train_column_ranges() -> list[tuple[int, int]]:
    """The column ranges [start, stop) training data may use: the scene less the strip and its gaps."""
    start, stop = HELD_OUT_COLUMNS
    return [(0, start - GAP), (stop + GAP, WIDTH)]


def split_column_ranges(split: str) -> list[tuple[int, int]]:
    if split not in SPLIT_NAMES:
        raise ZooError(f"unknown split '{split}'; available splits: {', '.join(SPLIT_NAMES)}")
    return {"train": train_column_ranges(), "test": [HELD_OUT_COLUMNS], "all": [(0, WIDTH)]}[split]


def _starts(start: int, stop: int) -> list[int]:
    """Tile starts covering [start, stop): every PATCH, the last one flush with `stop`."""
    starts = list(range(start, stop - PATCH + 1, PATCH))
    if starts[-1] + PATCH < stop:
        starts.append(stop - PATCH)
    return starts


def tile_origins(split: str) -> list[tuple[int, int]]:
    """(row, column) of each PATCH x PATCH tile of `split`, row-major per column range."""
    return [(row, col) for start, stop in split_column_ranges(split)
            for row in _starts(0, HEIGHT) for col in _starts(start, stop)]


@dataclass
class DepthDataset:
    """Aligned tiles: ``rgb`` (N, 3, P, P), degraded ``lr`` (N, 1, P/4, P/4) and ground truth ``depth``
    (N, 1, P, P) in mm, and ``valid`` (N, 1, P, P): the pixels scored (with ground truth, each pixel of
    the split once: where tiles overlap, only the first tile scores it).  ``origins`` (N, 2) are the
    tiles' (row, column) in the scene."""

    name: str
    split: str
    rgb: torch.Tensor
    lr: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    origins: torch.Tensor

    def __len__(self) -> int:
        return int(self.origins.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield ``(rgb, lr, depth, valid)`` batches in order (the last one may be short)."""
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            yield self.rgb[start:end], self.lr[start:end], self.depth[start:end], self.valid[start:end]


def crop_tiles(origins: list[tuple[int, int]], lr_scene: torch.Tensor,
               scene: DepthScene | None = None) -> tuple[torch.Tensor, ...]:
    """``(rgb, lr, depth, valid)`` tiles at `origins` (rows and columns multiples of SCALE)."""
    scene = scene or load_scene()
    low = PATCH // SCALE
    rgb, lr, depth, valid = [], [], [], []
    for row, col in origins:
        window = (slice(None), slice(row, row + PATCH), slice(col, col + PATCH))
        rgb.append(scene.rgb[window])
        depth.append(scene.depth[window])
        valid.append(scene.valid[window])
        lr.append(lr_scene[:, row // SCALE:row // SCALE + low, col // SCALE:col // SCALE + low])
    return tuple(torch.stack(t).contiguous() for t in (rgb, lr, depth, valid))


def load_depth_dataset(split: str) -> DepthDataset:
    """The scene's `split` as tiles with their seeded degraded inputs (see module doc)."""
    origins = tile_origins(split)
    rgb, lr, depth, valid = crop_tiles(origins, degraded_scene_lr())
    scored = torch.zeros(1, HEIGHT, WIDTH, dtype=torch.bool)
    for index, (row, col) in enumerate(origins):
        window = (slice(None), slice(row, row + PATCH), slice(col, col + PATCH))
        valid[index] &= ~scored[window]
        scored[window] = True
    return DepthDataset(DATASET, split, rgb, lr, depth, valid, torch.tensor(origins, dtype=torch.int64))


def random_train_origins(count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """`count` random tile origins (multiples of SCALE) inside the training column ranges: none touches the
    held-out strip or its gaps."""
    ranges = train_column_ranges()
    widths = torch.tensor([stop - start - PATCH + SCALE for start, stop in ranges], dtype=torch.float64)
    which = torch.multinomial(widths, count, replacement=True, generator=generator).tolist()
    rows = torch.randint(0, (HEIGHT - PATCH) // SCALE + 1, (count,), generator=generator).tolist()
    origins = []
    for index, row in zip(which, rows):
        start, stop = ranges[index]
        col = start + int(torch.randint(0, (stop - start - PATCH) // SCALE + 1, (1,), generator=generator)) * SCALE
        origins.append((row * SCALE, col))
    return origins


def random_train_crops(count: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """`count` random training tiles ``(rgb, lr, depth, valid)`` (see `random_train_origins`), each with
    freshly drawn degradation."""
    scene = load_scene()
    rgb, clean, depth, valid = crop_tiles(random_train_origins(count, generator), clean_scene_lr(), scene)
    return rgb, degrade(clean, generator), depth, valid


# -- the model ------------------------------------------------------------------------------------------------

def bicubic_upsample(lr: torch.Tensor) -> torch.Tensor:
    """Bicubic x SCALE upsampling of a depth batch (the baseline GDNet-lite refines)."""
    return F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False)


def bicubic_baseline(rgb: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Bicubic upsampling called like the model: ``(rgb, lr) -> depth`` (rgb unused)."""
    del rgb
    return bicubic_upsample(lr)


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    """``Conv2d(kernel, dilation, same padding, no bias) -> BatchNorm2d -> ReLU``."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2),
                                   dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class FineDetailEncoder(nn.Module):
    """High-resolution depth features sharpened by RGB image features (residual guided fusion)."""

    def __init__(self, width: int, blocks: int = 2):
        super().__init__()
        self.image = nn.Sequential(conv_bn_relu(3, width), conv_bn_relu(width, width))
        self.depth = conv_bn_relu(1, width)
        self.fuse = nn.ModuleList(conv_bn_relu(2 * width, width, dilation=2) for _ in range(blocks))

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        image, features = self.image(rgb), self.depth(depth)
        for fuse in self.fuse:
            features = features + fuse(torch.cat([features, image], dim=1))
        return features


class GlobalGeometryEncoder(nn.Module):
    """Low-resolution depth features squeezed through a rank-`rank` code (noise suppression), upsampled."""

    def __init__(self, width: int, global_width: int, rank: int):
        super().__init__()
        self.encode = nn.Sequential(conv_bn_relu(1, global_width), conv_bn_relu(global_width, global_width),
                                    conv_bn_relu(global_width, global_width))
        self.project = nn.Sequential(nn.Conv2d(global_width, rank, 1, bias=False), nn.BatchNorm2d(rank))
        self.expand = conv_bn_relu(rank, width, kernel=1)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        code = self.project(self.encode(lr))
        return F.interpolate(self.expand(code), scale_factor=SCALE, mode="bilinear", align_corners=False)


class GDNetLite(nn.Module):
    """``(rgb (B, 3, 64, 64) in [0, 1], lr depth (B, 1, 16, 16) in mm) -> depth (B, 1, 64, 64) in mm``."""

    def __init__(self, width: int = 16, global_width: int = 32, rank: int = 4):
        super().__init__()
        self.detail = FineDetailEncoder(width)
        self.geometry = GlobalGeometryEncoder(width, global_width, rank)
        self.decode = nn.Sequential(conv_bn_relu(2 * width, width), conv_bn_relu(width, width),
                                    nn.Conv2d(width, 1, 3, padding=1))
        nn.init.zeros_(self.decode[-1].weight)  # training starts from plain bicubic upsampling
        nn.init.zeros_(self.decode[-1].bias)

    def forward(self, rgb: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        up = bicubic_upsample(lr)
        centre = lr.mean(dim=(2, 3), keepdim=True)
        detail = self.detail(rgb, (up - centre) / DEPTH_UNIT_MM)
        geometry = self.geometry((lr - centre) / DEPTH_UNIT_MM)
        residual = self.decode(torch.cat([detail, geometry], dim=1))
        return up + residual * DEPTH_UNIT_MM
