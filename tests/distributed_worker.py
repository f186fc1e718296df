"""One process of a distributed pipeline run, for tests/test_distributed.py.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py MODEL PIPELINE OUT [METRICS]

Loads MODEL (a Hugging Face folder or a zoo name, as on the command line), scores its blocks (unrounded
`block_scores` by each of METRICS, a comma list; default ppl,angular; "" for none), runs
PIPELINE on 4 calibration batches (the CLI's default) with the model as teacher, and writes
OUT/rank<R>.safetensors (the result graph's tensors) and OUT/rank<R>.json (the scores and each pass's
stats) from every rank, so a test can check that every rank holds the same result and that it
equals a single-process run (`run_pipeline` in one process writes rank0).

    ... tests/distributed_worker.py tokens OUT

trains a small tail-drop token autoencoder (`train_token_autoencoder`) on random images and writes
OUT/rank<R>.safetensors (its state dict) from every rank.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def run_pipeline(spec: str, pipeline: str, out: str, metrics: str = "ppl,angular") -> None:
    from safetensors.torch import save_file

    import fxpress
    from fxpress.analysis.manager import MainBlockStack
    from fxpress.passes.depth.remove_layers import block_scores
    from fxpress.eval import calibration_batches
    from fxpress.passes import PassContext, PassManager
    from fxpress.utils import distributed
    from fxpress.zoo.specs import resolve_model

    torch.set_num_threads(1)
    distributed.init_from_env()
    rank, _ = distributed.world()
    model = resolve_model(spec)
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims)
    ctx = PassContext(calibration=calibration_batches(model, count=4), teacher=model.module)
    stack = ctx.analyses.get(graph, MainBlockStack)
    scores = {metric: block_scores(graph, stack, metric, ctx) for metric in metrics.split(",") if metric}
    result = PassManager(pipeline).run(graph, ctx)
    tensors = {path: t.detach().clone().contiguous() for path, t in result.graph.referenced_tensors().items()}
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(out) / f"rank{rank}.safetensors"))
    stats = [{"pass": r.pass_text, "stats": r.stats} for r in result.reports]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"scores": scores, "passes": stats}, default=str))
    distributed.close()


def train_tokens(out: str) -> None:
    from safetensors.torch import save_file

    from fxpress.training.tokens import AETrainConfig, TokenAEConfig, TokenAutoencoder, train_token_autoencoder
    from fxpress.utils import distributed

    torch.set_num_threads(1)
    distributed.init_from_env()
    torch.manual_seed(0)
    images = torch.rand(20, 1, 28, 28)
    model = TokenAutoencoder(TokenAEConfig(tokens=4, token_dim=2, dim=16, heads=2, patch_channels=8))
    train_token_autoencoder(model, images, AETrainConfig(epochs=2, batch_size=8), seed=0)  # batches of 8, 8, 4
    Path(out).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(out) / f"rank{distributed.world()[0]}.safetensors"))
    distributed.close()


if __name__ == "__main__":
    if sys.argv[1] == "tokens":
        train_tokens(sys.argv[2])
    else:
        run_pipeline(*sys.argv[1:5])
