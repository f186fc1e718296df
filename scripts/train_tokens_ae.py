"""Train the `tokens-ae` fixture: two 1D-token autoencoders on MNIST-5k, with and without tail drop.

Reproduces fxpress/zoo/fixtures/tokens_ae.{safetensors,json} (seeded,
single-threaded, CPU):

    python scripts/train_tokens_ae.py

Both models (`TokenAutoencoder`, 16 tokens of 4 numbers) train on the 4000
"train" images of `load_dataset("mnist-5k")` with the same seed; "tail_drop"
keeps a random prefix of its tokens on every batch (One-D-Piece's
regularizer; a quarter of its batches keep all 16), "plain" always decodes all 16.  The JSON records each model's
reconstruction MSE on the 1000 held-out "test" images for every number of
kept tokens, measured through the `tail-drop{keep=k}` pass on the captured
graph.
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxpress  # noqa: E402
from fxpress.passes import PassContext  # noqa: E402
from fxpress.passes.tokens.tail_drop import TailDrop  # noqa: E402
from fxpress.training.tokens import (AETrainConfig, TokenAEConfig, TokenAutoencoder,  # noqa: E402
                                            reconstruction_error, train_token_autoencoder)
from fxpress.zoo.datasets import load_dataset  # noqa: E402
from fxpress.zoo.fixture_io import FIXTURE_DIR, save_fixture  # noqa: E402

COMMAND = "python scripts/train_tokens_ae.py"
FULL_PROB = 0.25  # a quarter of the tail-drop batches keep every token, so the last tokens train too


def error_by_kept_tokens(model: TokenAutoencoder, images: torch.Tensor) -> list[float]:
    """Test MSE for keep = 1..tokens, each through the tail-drop pass on the captured graph."""
    graph = fxpress.capture(model, (images[:2],), dynamic=True)
    errors = []
    for keep in range(1, model.config.tokens + 1):
        result = TailDrop(keep=keep)(graph, PassContext())
        errors.append(round(reconstruction_error(result.graph, images), 6))
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=AETrainConfig.epochs)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    config = TokenAEConfig()
    train = load_dataset("mnist-5k", "train").images
    test = load_dataset("mnist-5k", "test").images
    models, records, seconds = {}, {}, {}
    for name, tail_drop in (("tail_drop", True), ("plain", False)):
        torch.manual_seed(args.seed)
        models[name] = TokenAutoencoder(config)
        train_config = AETrainConfig(epochs=args.epochs, tail_drop=tail_drop, full_prob=FULL_PROB if tail_drop else 0.0)
        seconds[name] = round(train_token_autoencoder(models[name], train, train_config, args.seed), 1)
        records[name] = {"train": train_config.to_dict(), "test_mse_by_keep": error_by_kept_tokens(models[name], test)}
        print(f"{name:10s} trained in {seconds[name]:6.1f} s; test MSE by kept tokens:",
              " ".join(f"{e:.4f}" for e in records[name]["test_mse_by_keep"]))
    meta = {
        "model": "tokens-ae",
        "architecture": "fxpress.training.tokens.TokenAutoencoder (x2: tail_drop, plain)",
        "config": config.to_dict(),
        "models": records,
        "dataset": {"name": "mnist-5k", "train_split": "train", "eval_split": "test"},
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": seconds,
        "params": sum(p.numel() for p in models["plain"].parameters()),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": COMMAND,
    }
    save_fixture("tokens-ae", nn.ModuleDict(models), meta, args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
