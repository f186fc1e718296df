"""contrastive_loss on paired batches: lower for true pairs, gradients flow, shapes fixed."""
from __future__ import annotations

import pytest
import torch

from fxpress.training.losses import contrastive_loss, paired_batches, sentence_embeddings
from fxpress.zoo import load_dataset

torch.set_num_threads(1)

PAIRS = [("json.dumps", "Serialize an object to a JSON formatted string."),
         ("os.path.join", "Join two or more pathname components, inserting a separator."),
         ("heapq.heappush", "Push an item onto the heap, keeping the heap invariant."),
         ("random.shuffle", "Shuffle a list in place and return None."),
         ("gzip.open", "Open a gzip-compressed file in binary or text mode.")]


def synthetic(pairs: int = 6, seq: int = 5, hidden: int = 16, noise: float = 0.1):
    """Hidden states whose documents are noisy copies of their queries, with an all-ones mask."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(pairs, seq, hidden, generator=gen)
    documents = queries + noise * torch.randn(pairs, seq, hidden, generator=gen)
    mask = torch.ones(2 * pairs, seq, dtype=torch.int64)
    return torch.cat([queries, documents]), (torch.zeros(2 * pairs, seq, dtype=torch.int64), mask)


def test_true_pairs_have_a_lower_loss_than_shuffled_ones():
    hidden, batch = synthetic()
    half = hidden.shape[0] // 2
    shuffled = torch.cat([hidden[:half], hidden[half:].roll(1, dims=0)])
    assert float(contrastive_loss(hidden, batch)) < 0.1 < float(contrastive_loss(shuffled, batch))


def test_the_loss_is_symmetric_in_queries_and_documents():
    hidden, batch = synthetic()
    half = hidden.shape[0] // 2
    swapped = torch.cat([hidden[half:], hidden[:half]])
    torch.testing.assert_close(contrastive_loss(swapped, batch), contrastive_loss(hidden, batch))


def test_padding_positions_do_not_count():
    hidden, (ids, mask) = synthetic()
    mask[:, -2:] = 0
    changed = hidden.clone()
    changed[:, -2:] = 100.0
    torch.testing.assert_close(contrastive_loss(changed, (ids, mask)), contrastive_loss(hidden, (ids, mask)))
    torch.testing.assert_close(sentence_embeddings(hidden, mask).norm(dim=-1), torch.ones(hidden.shape[0]))


def test_gradients_flow_to_the_hidden_states():
    hidden, batch = synthetic(noise=1.0)
    hidden.requires_grad_(True)
    contrastive_loss(hidden, batch).backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("output", [torch.zeros(3, 4, 8), torch.zeros(4, 8)])
def test_an_output_that_is_not_a_paired_batch_is_refused(output):
    with pytest.raises(ValueError, match="paired batch|hidden state"):
        contrastive_loss(output, (torch.zeros(output.shape[0], 4), torch.ones(output.shape[0], 4)))


def test_paired_batches_have_fixed_shapes_queries_first(zoo_model):
    tokenizer = zoo_model("minilm").tokenizer
    batches = paired_batches(tokenizer, PAIRS, batch_pairs=2, max_len=24)
    assert len(batches) == 2  # the fifth pair does not fill a batch
    for ids, mask in batches:
        assert ids.shape == mask.shape == (4, 24) and ids.dtype == mask.dtype == torch.int64
    first = tokenizer.decode(batches[1][0][0], skip_special_tokens=True)
    document = tokenizer.decode(batches[1][0][2], skip_special_tokens=True)
    assert first.replace(" ", "") == "heapq.heappush" and document.startswith("push an item")
    with pytest.raises(ValueError, match="do not fill"):
        paired_batches(tokenizer, PAIRS, batch_pairs=6, max_len=24)


def test_minilm_matches_stdlib_docs_pairs_better_than_shuffled_pairs(zoo_model):
    model = zoo_model("minilm")
    train = load_dataset("stdlib-docs", "train", max_items=8)
    pairs = list(zip(train.titles, train.texts))
    (ids, mask), = paired_batches(model.tokenizer, pairs, batch_pairs=8, max_len=64)
    shuffled_pairs = [(q, pairs[(i + 1) % 8][1]) for i, (q, _) in enumerate(pairs)]
    (s_ids, s_mask), = paired_batches(model.tokenizer, shuffled_pairs, batch_pairs=8, max_len=64)
    with torch.no_grad():
        true_loss = contrastive_loss(model.module(ids, mask), (ids, mask))
        shuffled_loss = contrastive_loss(model.module(s_ids, s_mask), (s_ids, s_mask))
    assert float(true_loss) < float(shuffled_loss)
