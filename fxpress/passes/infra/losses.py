"""The default task loss of passes that score importance, take gradients or train, and their schedule.

`PassContext.task_loss(output, batch, reference)` uses the context's `loss`
when one is set (an encoder's retrieval loss, a classifier's cross-entropy)
and otherwise `default_task_loss`: next-token cross-entropy for causal-LM
logits, else the squared error relative to a reference output.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def looks_like_lm(batch: tuple, output: Any) -> bool:
    """Integer (B, S) input ids and (B, S, V) logits with every id < V: a causal LM's next-token task."""
    ids = batch[0] if batch else None
    return (isinstance(ids, torch.Tensor) and isinstance(output, torch.Tensor) and not ids.is_floating_point()
            and ids.dim() == 2 and output.dim() == 3 and tuple(output.shape[:2]) == tuple(ids.shape)
            and int(ids.max()) < output.shape[-1])


def default_task_loss(output: torch.Tensor, batch: tuple, reference: torch.Tensor | None) -> torch.Tensor:
    """Next-token cross-entropy for causal-LM logits; else squared error relative to `reference`."""
    if looks_like_lm(batch, output):
        ids = batch[0]
        return F.cross_entropy(output[:, :-1].reshape(-1, output.shape[-1]).float(), ids[:, 1:].reshape(-1))
    if reference is None:
        raise ValueError("the output is not causal-LM logits and no reference output was given; set "
                         "PassContext(loss=...) to the model's task loss")
    return ((output - reference) ** 2).mean() / (reference ** 2).mean().clamp_min(1e-12)


def cosine_decay(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * (1 + cos(pi * step / steps)) / 2: the last steps settle on the grid instead of hopping across it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
