"""Train the zoo's `bnn-digits` fixture: an XNOR-Net binary CNN on sklearn digits.

Reproduces fxpress/zoo/fixtures/bnn_digits.{safetensors,json} (seeded,
single-threaded, CPU):

    python scripts/train_bnn_digits.py

Trains on the "train" split of `load_dataset("digits")` (1442 images)
with small random shifts and records top-1 accuracy on the 355 held-out
"test" images.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxpress.zoo.bnn import BinaryDigitsNet  # noqa: E402
from fxpress.zoo.datasets import load_dataset  # noqa: E402
from fxpress.zoo.fixture_io import FIXTURE_DIR, save_fixture  # noqa: E402
from fxpress.zoo.training import TrainConfig, accuracy, fixture_metadata, train_classifier  # noqa: E402

CONFIG = {"width": 32, "hidden": 128, "num_classes": 10}
TRAIN = TrainConfig(epochs=60, batch_size=64, lr=3e-3, weight_decay=0.0, warmup_epochs=2,
                    max_shift_px=0.5)
COMMAND = "python scripts/train_bnn_digits.py"


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

    model = BinaryDigitsNet(**CONFIG)
    train_config = TrainConfig(**{**TRAIN.to_dict(), "epochs": args.epochs})
    seconds = train_classifier(model, load_dataset("digits", "train"), train_config, args.seed)
    test_accuracy = accuracy(model, load_dataset("digits", "test"))
    logging.info("test accuracy %.4f after %.1f s", test_accuracy, seconds)
    meta = fixture_metadata(model, name="bnn-digits", config=CONFIG, train=train_config, dataset="digits",
                            test_accuracy=test_accuracy, seed=args.seed, threads=args.threads,
                            seconds=seconds, command=COMMAND)
    save_fixture("bnn-digits", model, meta, args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
