"""Fine-tune bnn-digits with the MST regularizer: fxpress/zoo/fixtures/bnn_digits_mst.*

Starts from the shipped bnn-digits fixture and runs
`fxpress.training.mst.finetune_mst` (seeded, single-threaded,
CPU; about half a minute):

    python scripts/finetune_bnn_mst.py

The JSON record holds the held-out accuracy before and after, the
network's dense and MST bit-ops per image before and after, and the
sha256 of the weights it started from (tests check it is still current).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxpress.training.mst import (FINETUNED_FIXTURE, MSTFinetuneConfig, finetune_mst,  # noqa: E402
                                          fixture_digest)
from fxpress.zoo import load_dataset, load_model  # noqa: E402
from fxpress.zoo.fixture_io import FIXTURE_DIR, save_fixture  # noqa: E402
from fxpress.zoo.training import accuracy  # noqa: E402

COMMAND = "python scripts/finetune_bnn_mst.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    base = load_model("bnn-digits")
    model = copy.deepcopy(base.module)
    config = dataclasses.replace(MSTFinetuneConfig(), seed=args.seed)
    result = finetune_mst(model, load_dataset("digits", "train"), config)
    test = load_dataset("digits", "test")
    before, after = accuracy(base.module, test), accuracy(model, test)
    logging.info("accuracy %.4f -> %.4f, bit-ops ratio %.2f -> %.2f in %.1f s", before, after,
                 result.ratio_before, result.ratio_after, result.seconds)
    meta = {
        "model": FINETUNED_FIXTURE, "architecture": base.meta["architecture"], "config": base.meta["config"],
        "finetune": config.to_dict(), "dataset": base.meta["dataset"],
        "metrics": {"accuracy": round(after, 4), "accuracy_before": round(before, 4),
                    "dense_bitops": result.dense_bitops, "mst_bitops_before": result.mst_bitops_before,
                    "mst_bitops": result.mst_bitops_after, "ratio_before": round(result.ratio_before, 3),
                    "ratio": round(result.ratio_after, 3)},
        "source": "bnn-digits", "source_sha256": fixture_digest("bnn-digits"),
        "seconds": round(result.seconds, 1), "threads": 1, "command": COMMAND,
        "versions": {"torch": torch.__version__},
    }
    save_fixture(FINETUNED_FIXTURE, model, meta, args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
