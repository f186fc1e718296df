"""Retrieval quality of a sentence encoder: MRR on Python's pydoc topics.

Each topic title is a query and each topic's text a document; an
embedding is the attention-masked mean of the encoder's last hidden
state, L2-normalised (how all-MiniLM-L6-v2 is used), and documents are
ranked by cosine similarity.  MRR is the mean over queries of
1 / rank of the query's own document.  Texts are tokenized to a fixed
``(batch, max_len)`` shape (padding, truncation; short final batches
padded with empty rows), so a graph captured at that shape can be scored.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxpress.zoo import load_dataset

MAX_LEN = 128
BATCH = 16


def encode_texts(tokenizer: Any, texts: list[str], max_len: int = MAX_LEN,
                 batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Fixed-shape (input_ids, attention_mask, real rows) batches for `texts`."""
    batches = []
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        rows = len(chunk)
        chunk = chunk + [""] * (batch - rows)
        encoded = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_len,
                            return_tensors="pt")
        batches.append((encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64), rows))
    return batches


def embed(fn: Callable[..., torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (N, hidden) of `fn(input_ids, attention_mask)`."""
    rows = []
    with torch.no_grad():
        for ids, mask, count in batches:
            hidden = fn(ids, mask)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1)[:count])
    return torch.cat(rows)


def mean_reciprocal_rank(queries: torch.Tensor, documents: torch.Tensor) -> float:
    """MRR when query i's relevant document is document i."""
    scores = queries @ documents.T
    own = scores.diagonal().unsqueeze(1)
    ranks = (scores > own).sum(1) + 1
    return float((1.0 / ranks.double()).mean())


def pydoc_mrr(fn: Callable[..., torch.Tensor], tokenizer: Any, split: str = "all",
              max_len: int = MAX_LEN, batch: int = BATCH) -> float:
    """MRR of an encoder on pydoc topics (titles as queries, texts as documents)."""
    topics = load_dataset("pydoc-topics", split)
    queries = embed(fn, encode_texts(tokenizer, topics.titles, max_len, batch))
    documents = embed(fn, encode_texts(tokenizer, topics.texts, max_len, batch))
    return mean_reciprocal_rank(queries, documents)
