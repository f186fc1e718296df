"""Train the zoo's `gdnet-lite` fixture: RGB-guided x4 depth super-resolution on a real Middlebury scene.

Reproduces fxpress/zoo/fixtures/gdnet_lite.{safetensors,json} (seeded,
single-threaded, CPU):

    python scripts/train_gdnet_lite.py

Trains on random 64x64 crops of scikit-image's Motorcycle scene outside
the held-out strip (columns [448, 640) and a 16-column gap on each side),
each with freshly drawn degradation (4x4 area mean, noise, quantization)
and a random horizontal flip, with an L1 loss on the pixels that have
ground truth.  Records the RMSE in mm on the 24 tiles of the strip
("test" split of `motorcycle-depth`), and bicubic upsampling's RMSE on
the same inputs.  GDNet-lite is a reconstruction of GDNet from its paper
(fxpress/zoo/gdnet.py, docs/gdnet.md).
"""
from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxpress  # noqa: E402
from fxpress.eval.depth import bicubic_baseline, depth_rmse  # noqa: E402
from fxpress.zoo import gdnet  # noqa: E402
from fxpress.zoo.fixture_io import FIXTURE_DIR, save_fixture  # noqa: E402

CONFIG = {"width": 16, "global_width": 32, "rank": 4}
COMMAND = "python scripts/train_gdnet_lite.py"


@dataclass(frozen=True)
class DepthTrainConfig:
    """AdamW with linear warm-up then cosine decay, over `steps` batches of `batch_size` random crops."""

    steps: int = 700
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    flip: bool = True
    loss: str = "mse"  # "mse" (what RMSE scores) or "l1", on the error in metres over pixels with ground truth


TRAIN = DepthTrainConfig()


def _lr_at(step: int, config: DepthTrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _flip_some(tiles: tuple[torch.Tensor, ...], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Mirror a random half of the tiles left to right (every tensor of a tile alike)."""
    flip = torch.rand(tiles[0].shape[0], generator=generator) < 0.5
    return tuple(torch.where(flip[:, None, None, None], t.flip(-1), t) for t in tiles)


def train(model: gdnet.GDNetLite, config: DepthTrainConfig, seed: int) -> float:
    """Train `model` in place; return seconds taken."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start, running = time.perf_counter(), 0.0
    model.train()
    for step in range(config.steps):
        tiles = gdnet.random_train_crops(config.batch_size, generator)
        rgb, lr, depth, valid = _flip_some(tiles, generator) if config.flip else tiles
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        error = ((model(rgb, lr) - depth) / gdnet.DEPTH_UNIT_MM)[valid]
        loss = error.abs().mean() if config.loss == "l1" else (error ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item()
        if (step + 1) % 50 == 0:
            logging.info("step %d/%d %s loss %.5f (%.1f s)", step + 1, config.steps, config.loss, running / 50,
                         time.perf_counter() - start)
            running = 0.0
    model.eval()
    return time.perf_counter() - start


def metadata(model: gdnet.GDNetLite, config: DepthTrainConfig, metrics: dict, seed: int, threads: int,
             seconds: float) -> dict:
    """The JSON record shipped beside the weights (the keys of the other fixtures', and the data's setup)."""
    example = gdnet.load_depth_dataset("test")
    graph = fxpress.capture(model, (example.rgb[:1], example.lr[:1]))
    return {
        "model": "gdnet-lite",
        "architecture": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": CONFIG,
        "train": asdict(config),
        "dataset": {"name": gdnet.DATASET, "train_split": "random crops of the train columns",
                    "eval_split": "test", "held_out_columns": list(gdnet.HELD_OUT_COLUMNS), "gap": gdnet.GAP},
        "degradation": {"scale": gdnet.SCALE, "downsample": "area mean", "noise_mm": gdnet.NOISE_MM,
                        "quant_step_mm": gdnet.QUANT_STEP_MM, "eval_seed": gdnet.DEGRADE_SEED},
        "metrics": metrics,
        "seed": seed,
        "threads": threads,
        "train_seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "macs_per_tile": graph.macs,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": COMMAND,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TRAIN.steps)
    parser.add_argument("--loss", choices=("mse", "l1"), default=TRAIN.loss)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = gdnet.GDNetLite(**CONFIG)
    config = DepthTrainConfig(**{**asdict(TRAIN), "steps": args.steps, "loss": args.loss})
    seconds = train(model, config, args.seed)
    metrics = {"rmse_mm": round(depth_rmse(model, gdnet.DATASET), 3),
               "bicubic_rmse_mm": round(depth_rmse(bicubic_baseline, gdnet.DATASET), 3)}
    logging.info("held-out RMSE %.2f mm (bicubic %.2f mm) after %.1f s", metrics["rmse_mm"],
                 metrics["bicubic_rmse_mm"], seconds)
    meta = metadata(model, config, metrics, args.seed, args.threads, seconds)
    save_fixture("gdnet-lite", model, meta, args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
