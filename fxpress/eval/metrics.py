"""The public metrics: perplexity, accuracy, retrieval MRR of any model-like callable.

Each takes `fn`: an eager ``nn.Module`` (a Hugging Face model too: its
``.logits`` / ``.last_hidden_state`` is used), a captured or compressed
:class:`fxpress.ir.Graph`, a compiled model (``fxpress.compile``), or any
function of tensors.  Data is batched in sizes `fn` accepts
(:mod:`fxpress.eval.batching`): a static batch dim fixes the batch size (a
short last batch is padded and the padding ignored); a static sequence dim
fixes the token block length, so text is cut into blocks of the graph's
sequence length.  Dynamic dims take `batch_size` / the default.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch

from fxpress.errors import DataError, ZooError
from fxpress.eval.batching import SEQ_DIM, batch_size_for, fit_rows, fixed_dims, fixed_size, seq_len_for
from fxpress.eval.retrieval import BATCH, DOCS, MAX_LEN, QUERY_LEN, retrieval_ranks
from fxpress.eval.sources import TEXT_PREFIX, Source, load_text, parse_source
from fxpress.zoo import ImageDataset, TextDataset, list_datasets, load_dataset, text_blocks

EVAL_BATCH = 256  # images per batch for accuracy
LM_BLOCK_LEN = 64  # tokens per perplexity block (unless the model fixes its sequence length)
LM_BATCH = 4  # blocks per batch for perplexity

TextLike = str | Path | Source | TextDataset | torch.Tensor


def perplexity(fn: Callable[..., Any], text: TextLike, *, tokenizer: Any = None, block_len: int | None = None,
               max_blocks: int | None = None, batch_size: int | None = None, split: str = "test") -> float:
    """exp(mean next-token cross-entropy) of a causal LM's logits over consecutive token blocks.

    `text`: a string of text, a ``Path`` to a UTF-8 file, a source (``"text:FILE"`` or a dataset name such
    as ``"shakespeare"``, whose `split` is used; as a string or from ``parse_source``), a ``TextDataset``,
    or ready token blocks (int64 ``(N, L)``).  Text needs `tokenizer` (a Hugging Face tokenizer, e.g.
    ``ZooModel.tokenizer``) and is cut into `block_len`-token blocks (default 64); the tail that does not
    fill a block is dropped.
    When `fn` has a static sequence length (a graph captured with static shapes) blocks are cut to that
    length instead, ready blocks too.  `max_blocks` caps the blocks scored (from the start of the text).
    """
    blocks = _token_blocks(fn, text, tokenizer, block_len, max_blocks, split)
    size = batch_size_for(fn, batch_size, LM_BATCH)
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), size):
            ids = blocks[start:start + size]
            logits = _output_tensor(fn(fit_rows(fn, ids, size)), "logits")[:len(ids)]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
            total_loss += float(loss)
            total_tokens += ids[:, 1:].numel()
    if total_tokens == 0:
        raise DataError("perplexity needs blocks of at least 2 tokens")
    return math.exp(total_loss / total_tokens)


def _token_blocks(fn: Any, text: TextLike, tokenizer: Any, block_len: int | None, max_blocks: int | None,
                  split: str) -> torch.Tensor:
    if max_blocks is not None and max_blocks < 1:
        raise DataError(f"max_blocks must be >= 1, got {max_blocks}")
    if isinstance(text, torch.Tensor):
        return _recut(text, fixed_size(fn, SEQ_DIM) or block_len)[:max_blocks]
    length = seq_len_for(fn, block_len, LM_BLOCK_LEN)
    if tokenizer is None:
        raise DataError("perplexity of text needs a tokenizer (e.g. tokenizer=model.tokenizer of a ZooModel)")
    what = "perplexity text"
    if isinstance(text, str) and _names_a_source(text):
        text = parse_source(text)
    if isinstance(text, Path):
        what, text = f"text file {text}", load_text(Source("text", str(text)))
    elif isinstance(text, Source):
        what, text = f"perplexity data {text}", load_text(text, split)
    elif isinstance(text, TextDataset):
        text = text.text
    if not isinstance(text, str) or not text.strip():
        raise DataError("perplexity needs text: a non-empty string, a Path, a source, a TextDataset or blocks")
    return token_blocks(tokenizer, text, length, max_blocks, what)


def _names_a_source(text: str) -> bool:
    """True for ``text:FILE`` (one line) and dataset names: such strings are read as sources, not as text."""
    return (text.startswith(TEXT_PREFIX) and "\n" not in text) or text in list_datasets()


def token_blocks(tokenizer: Any, text: str, length: int, max_blocks: int | None, what: str) -> torch.Tensor:
    """`text_blocks` with a DataError naming `what` when the text does not fill one block.

    transformers warns once that a long text exceeds the model's length: blocks are cut after
    tokenizing, so that warning is kept off the terminal.
    """
    hf_tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")
    level = hf_tokenizer_log.level
    hf_tokenizer_log.setLevel(logging.ERROR)
    try:
        return text_blocks(tokenizer, text, length, max_blocks=max_blocks)
    except ZooError as err:
        raise DataError(f"{what}: {err} (use more text, or a model with a shorter sequence)") from err
    finally:
        hf_tokenizer_log.setLevel(level)


def _recut(blocks: torch.Tensor, length: int | None) -> torch.Tensor:
    """Token blocks (N, L) cut into blocks of `length` tokens (each row's tail that does not fit is dropped)."""
    if blocks.dim() != 2 or blocks.dtype.is_floating_point:
        raise DataError(f"token blocks must be an integer (N, L) tensor, got {blocks.dtype}{list(blocks.shape)}")
    if length is None or length == blocks.shape[1]:
        return blocks
    if blocks.shape[1] < length:
        raise DataError(f"blocks of {blocks.shape[1]} tokens are shorter than the model's {length}")
    pieces = blocks.shape[1] // length
    return blocks[:, :pieces * length].reshape(-1, length)


def accuracy(fn: Callable[..., Any], data: str | ImageDataset | tuple[torch.Tensor, torch.Tensor], *,
             split: str = "test", batch_size: int | None = None, max_items: int | None = None) -> float:
    """Top-1 accuracy of a classifier's logits on images.

    `data`: an image dataset name (``digits``, ``mnist-5k``: its `split`), an ``ImageDataset`` or
    ``(images, labels)``.  `max_items` scores only the first images.  Batches hold `batch_size` images
    (default 256), or the model's static batch size.
    """
    images, labels = _images(data, split)
    if max_items is not None:
        images, labels = images[:max_items], labels[:max_items]
    check_image_shape(fn, images, f"accuracy data {data}" if isinstance(data, str) else "accuracy data")
    size = batch_size_for(fn, batch_size, EVAL_BATCH)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), size):
            batch = images[start:start + size]
            logits = _output_tensor(fn(fit_rows(fn, batch, size)), "logits")[:len(batch)]
            correct += int((logits.argmax(-1) == labels[start:start + size]).sum())
    return correct / max(len(labels), 1)


def _images(data: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, str):
        data = load_dataset(data, split)
    if isinstance(data, ImageDataset):
        return data.images, data.labels
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data
    raise DataError(f"accuracy needs an image dataset, its name or (images, labels), got {type(data).__name__}")


def check_image_shape(fn: Any, images: torch.Tensor, what: str = "accuracy data") -> None:
    """DataError if `fn` fixes a per-image dim (channels, height, width) that `images` do not have."""
    fixed = fixed_dims(fn)
    per_image = {d: size for d, size in (fixed[0] if fixed else {}).items() if d > 0}
    if any(d >= images.dim() or images.shape[d] != size for d, size in per_image.items()):
        wanted = ", ".join(f"dim {d} = {size}" for d, size in sorted(per_image.items()))
        raise DataError(f"{what}: images of shape {tuple(images.shape[1:])} do not fit the model, "
                        f"which takes {wanted}")


def mrr(fn: Callable[..., Any], tokenizer: Any, data: str | TextDataset = DOCS, *, split: str = "test",
        max_items: int | None = None, max_len: int | None = None, batch_size: int | None = None) -> float:
    """Mean reciprocal rank of a sentence encoder on (query, document) pairs.

    `fn(input_ids, attention_mask)` returns hidden states ``(B, S, H)``; embeddings are their masked mean,
    L2-normalised, and documents are ranked by cosine similarity (see :mod:`fxpress.eval.retrieval`).
    `data`: ``stdlib-docs`` (~1200 held-out pairs; queries use 32 tokens), ``pydoc-topics``, or a
    ``TextDataset`` (titles are the queries, texts their documents).  Texts are tokenized to `max_len`
    (default 128), or to the model's static sequence length; batches of `batch_size` (default 16) rows,
    or its static batch size.
    """
    return float(reciprocal_ranks(fn, tokenizer, data, split=split, max_items=max_items, max_len=max_len,
                                  batch_size=batch_size).mean())


def reciprocal_ranks(fn: Callable[..., Any], tokenizer: Any, data: str | TextDataset = DOCS, *,
                     split: str = "test", max_items: int | None = None, max_len: int | None = None,
                     batch_size: int | None = None) -> torch.Tensor:
    """Per-query reciprocal ranks (float64, in dataset order) behind :func:`mrr`, for paired comparisons."""
    if tokenizer is None:
        raise DataError("retrieval needs a tokenizer (e.g. tokenizer=model.tokenizer of a ZooModel)")
    length = seq_len_for(fn, max_len, MAX_LEN)
    static = fixed_size(fn, SEQ_DIM) is not None
    name = data.name if isinstance(data, TextDataset) else data
    query_len = length if static or name != DOCS else min(QUERY_LEN, length)
    size = batch_size_for(fn, batch_size, BATCH)
    encoder = lambda ids, mask: _output_tensor(fn(ids, mask), "last_hidden_state")  # noqa: E731
    return retrieval_ranks(encoder, tokenizer, data, split, max_items, length, query_len, size)


def _output_tensor(output: Any, field: str) -> torch.Tensor:
    """The tensor a metric scores: the output itself, its `field` (HF ModelOutput), or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, field, None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"the model returned {type(output).__name__}; metrics need a tensor ({field})")
