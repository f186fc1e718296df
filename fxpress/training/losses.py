"""Task losses for training and scoring encoders: in-batch contrastive retrieval.

A *paired batch* is ``(input_ids, attention_mask)`` with 2N rows: rows
``[0:N]`` are queries and rows ``[N:2N]`` their documents, in the same
order (row i's document is row N + i).  ``contrastive_loss`` is the
symmetric InfoNCE of sentence embeddings (mask-weighted mean of the last
hidden state, L2-normalised, as all-MiniLM-L6-v2 is used) over such a
batch: every other document (query) in the batch is a negative.  Set it
as ``PassContext(loss=contrastive_loss)`` with paired calibration batches
(``paired_batches``) so passes score importance and train on retrieval.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

TEMPERATURE = 0.05


def sentence_embeddings(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H) L2-normalised mean of `hidden` (B, S, H) over the positions where `mask` (B, S) is set."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def contrastive_loss(output: Any, batch: tuple, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric in-batch InfoNCE of a paired batch: query i should match document i (and back)."""
    if not isinstance(output, torch.Tensor) or output.dim() != 3:
        raise ValueError(f"contrastive_loss needs the encoder's last hidden state (B, S, H), got "
                         f"{getattr(output, 'shape', type(output).__name__)}")
    if len(batch) < 2:
        raise ValueError("contrastive_loss needs a paired batch (input_ids, attention_mask)")
    rows = output.shape[0]
    if rows % 2 or rows < 2:
        raise ValueError(f"a paired batch has 2N rows (N queries, then their N documents), got {rows}; "
                         "build one with fxpress.training.losses.paired_batches")
    embeddings = sentence_embeddings(output.float(), batch[1])
    half = rows // 2
    logits = embeddings[:half] @ embeddings[half:].T / temperature
    targets = torch.arange(half, device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def paired_batches(tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_pairs: int,
                   max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Paired batches of `batch_pairs` (query, document) pairs: (input_ids, attention_mask), each
    int64 (2 * batch_pairs, max_len) (padded, truncated).  Pairs that do not fill a batch are dropped:
    padding rows would be identical negatives."""
    if batch_pairs < 1 or max_len < 1:
        raise ValueError(f"batch_pairs and max_len must be >= 1, got {batch_pairs} and {max_len}")
    if len(pairs) < batch_pairs:
        raise ValueError(f"{len(pairs)} pairs do not fill one batch of {batch_pairs}")
    batches = []
    for start in range(0, len(pairs) - batch_pairs + 1, batch_pairs):
        chunk = pairs[start:start + batch_pairs]
        texts = [query for query, _ in chunk] + [document for _, document in chunk]
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                            return_tensors="pt")
        batches.append((encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)))
    return batches
