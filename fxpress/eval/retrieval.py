"""Retrieval quality of a sentence encoder: MRR on stdlib-docs and pydoc topics.

Each query has one relevant document: a qualified name -> its docstring
(``stdlib-docs``, about 1200 held-out pairs, the set to compare methods
on) or a help-topic title -> its text (``pydoc-topics``, 79 topics: too
few to tell methods apart).  An embedding is the attention-masked mean of
the encoder's last hidden state, L2-normalised (how all-MiniLM-L6-v2 is
used), and documents are ranked by cosine similarity.  The reciprocal
rank of a query is 1 / rank of its own document; MRR is their mean, and
the per-query values feed paired comparisons (``fxpress.eval.stats``).
Texts are tokenized to a fixed ``(batch, max_len)`` shape (padding,
truncation; short final batches padded with empty rows), so a graph
captured at that shape can be scored; stdlib-docs queries (short names)
use ``query_len`` tokens.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxpress.training.losses import sentence_embeddings
from fxpress.zoo import TextDataset, load_dataset
from fxpress.zoo.datasets import head

MAX_LEN = 128
QUERY_LEN = 32  # stdlib-docs queries are qualified names: under 32 tokens
BATCH = 16
DOCS = "stdlib-docs"
PYDOC = "pydoc-topics"


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
            rows.append(sentence_embeddings(fn(ids, mask), mask)[:count])
    return torch.cat(rows)


def reciprocal_ranks(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """Float64 (N,): 1 / rank of document i among all documents for query i (ties ranked in its favour)."""
    scores = queries @ documents.T
    own = scores.diagonal().unsqueeze(1)
    ranks = (scores > own).sum(1) + 1
    return 1.0 / ranks.double()


def mean_reciprocal_rank(queries: torch.Tensor, documents: torch.Tensor) -> float:
    """MRR when query i's relevant document is document i."""
    return float(reciprocal_ranks(queries, documents).mean())


def retrieval_ranks(fn: Callable[..., torch.Tensor], tokenizer: Any, dataset: str | TextDataset = DOCS,
                    split: str = "test", max_items: int | None = None, max_len: int = MAX_LEN,
                    query_len: int | None = None, batch: int = BATCH) -> torch.Tensor:
    """Per-query reciprocal ranks (float64, in dataset order) of an encoder on a retrieval dataset
    (titles as queries, texts as documents): "stdlib-docs", "pydoc-topics" or a TextDataset of pairs.
    Queries are tokenized to `query_len` (default `max_len`), documents to `max_len`."""
    if isinstance(dataset, TextDataset):
        pairs = head(dataset, max_items) if max_items is not None else dataset
    else:
        pairs = load_dataset(dataset, split, max_items=max_items)
    queries = embed(fn, encode_texts(tokenizer, pairs.titles, query_len or max_len, batch))
    documents = embed(fn, encode_texts(tokenizer, pairs.texts, max_len, batch))
    return reciprocal_ranks(queries, documents)


def docs_reciprocal_ranks(fn: Callable[..., torch.Tensor], tokenizer: Any, split: str = "test",
                          max_items: int | None = None, max_len: int = MAX_LEN, query_len: int = QUERY_LEN,
                          batch: int = BATCH) -> torch.Tensor:
    """Per-query reciprocal ranks on stdlib-docs (qualified names -> docstrings)."""
    return retrieval_ranks(fn, tokenizer, DOCS, split, max_items, max_len, query_len, batch)


def docs_mrr(fn: Callable[..., torch.Tensor], tokenizer: Any, split: str = "test", max_items: int | None = None,
             max_len: int = MAX_LEN, query_len: int = QUERY_LEN, batch: int = BATCH) -> float:
    """MRR of an encoder on stdlib-docs (the held-out split by default)."""
    return float(docs_reciprocal_ranks(fn, tokenizer, split, max_items, max_len, query_len, batch).mean())


def pydoc_reciprocal_ranks(fn: Callable[..., torch.Tensor], tokenizer: Any, split: str = "all",
                           max_len: int = MAX_LEN, batch: int = BATCH) -> torch.Tensor:
    """Per-query reciprocal ranks on pydoc topics (titles -> texts)."""
    return retrieval_ranks(fn, tokenizer, PYDOC, split, None, max_len, None, batch)


def pydoc_mrr(fn: Callable[..., torch.Tensor], tokenizer: Any, split: str = "all",
              max_len: int = MAX_LEN, batch: int = BATCH) -> float:
    """MRR of an encoder on pydoc topics (titles as queries, texts as documents)."""
    return float(pydoc_reciprocal_ranks(fn, tokenizer, split, max_len, batch).mean())
