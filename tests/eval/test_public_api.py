"""fxpress.eval's public metrics on eager models, graphs (dynamic and static) and compiled models.

A graph captured with a dynamic batch from a batch-1 example must evaluate at batch 4; a static
graph is called only at its own batch size and sequence length.  Until capture from a batch-1
example works with dynamic dims (issue 17, item 1), "captured at batch 1" graphs are a batch-2
capture whose example inputs are cut to one row: what the metrics read (example_inputs,
dynamic_shapes) is then exactly what such a capture records.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress.errors import DataError
from fxpress.eval import (accuracy, calibration_batches, check_evaluable, evaluate, load_text, mrr, parse_source,
                          perplexity, read_text_file)
from fxpress.eval.batching import fixed_dims
from fxpress.ir import Graph
from fxpress.zoo import ZooModel, list_datasets, text_blocks

torch.set_num_threads(1)
SEQ_DIMS = {0: "batch", 1: "seq"}


def at_batch_1(graph: Graph) -> Graph:
    """The same graph with batch-1 example inputs (as a capture from a batch-1 example records them)."""
    return Graph(graph.module, tuple(x[:1] for x in graph.example_inputs), name=graph.name,
                 source=graph.source, dynamic_shapes=graph.dynamic_shapes)


@contextlib.contextmanager
def call_shapes(graph: Graph):
    """Records the shape of the first input of every call of `graph`."""
    shapes: list[tuple[int, ...]] = []
    handle = graph.module.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        yield shapes
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def text() -> str:
    return load_text("shakespeare", "test")[:20000]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, text) -> Path:
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm(tiny):
    """(eager tiny LM, dynamic graph at batch 1, static graph of shape (1, 16))."""
    model = tiny.tiny_lm()
    ids = torch.randint(0, len(tiny.tokenizer()), (2, 16), generator=torch.Generator().manual_seed(0))
    dynamic = fxpress.capture(model, (ids,), dynamic={0: SEQ_DIMS})
    static = fxpress.capture(model, (ids[:1],))
    return model, at_batch_1(dynamic), static


# -- perplexity -------------------------------------------------------------------------------

def test_perplexity_of_a_dynamic_graph_from_batch_1_runs_at_batch_4(lm, tiny, text):
    model, dynamic, _ = lm
    assert fixed_dims(dynamic) == [{}]
    with call_shapes(dynamic) as shapes:
        value = perplexity(dynamic, text, tokenizer=tiny.tokenizer(), max_blocks=8)
    assert shapes == [(4, 64), (4, 64)]
    assert value == pytest.approx(perplexity(model, text, tokenizer=tiny.tokenizer(), max_blocks=8), rel=1e-5)
    assert 1 < value < 2 * len(tiny.tokenizer())  # a random model: near the vocabulary size


def test_perplexity_of_a_static_graph_uses_its_batch_and_sequence_length(lm, tiny, text):
    model, _, static = lm
    assert fixed_dims(static) == [{0: 1, 1: 16}]
    with call_shapes(static) as shapes:
        value = perplexity(static, text, tokenizer=tiny.tokenizer(), max_blocks=6)
    assert shapes == [(1, 16)] * 6
    eager = perplexity(model, text, tokenizer=tiny.tokenizer(), block_len=16, max_blocks=6)
    assert value == pytest.approx(eager, rel=1e-5)
    with pytest.raises(DataError, match="static batch of 1"):
        perplexity(static, text, tokenizer=tiny.tokenizer(), batch_size=4)
    with pytest.raises(DataError, match="static sequence length of 16"):
        perplexity(static, text, tokenizer=tiny.tokenizer(), block_len=64)


def test_ready_blocks_are_cut_to_a_static_sequence_length(lm, tiny, text):
    model, _, static = lm
    blocks = text_blocks(tiny.tokenizer(), text, 40, max_blocks=3)  # 40 = 2 * 16 + a dropped tail of 8
    assert perplexity(static, blocks) == pytest.approx(perplexity(model, blocks[:, :32].reshape(6, 16)), rel=1e-5)
    with pytest.raises(DataError, match="shorter"):
        perplexity(static, blocks[:, :8])


def test_a_short_last_batch_of_a_static_graph_is_padded_and_ignored(tiny, text):
    model = tiny.tiny_lm()
    static = fxpress.capture(model, (torch.zeros(3, 16, dtype=torch.int64),))
    with call_shapes(static) as shapes:
        value = perplexity(static, text, tokenizer=tiny.tokenizer(), max_blocks=4)
    assert shapes == [(3, 16), (3, 16)]
    assert value == pytest.approx(perplexity(model, text, tokenizer=tiny.tokenizer(), block_len=16, max_blocks=4),
                                  rel=1e-5)


def test_perplexity_of_a_text_file_a_source_and_a_string_agree(lm, tiny, text, text_file):
    model = lm[0]
    tokenizer = tiny.tokenizer()
    expected = perplexity(model, text, tokenizer=tokenizer, max_blocks=4)
    assert perplexity(model, text_file, tokenizer=tokenizer, max_blocks=4) == expected
    assert perplexity(model, parse_source(f"text:{text_file}"), tokenizer=tokenizer, max_blocks=4) == expected
    assert perplexity(model, f"text:{text_file}", tokenizer=tokenizer, max_blocks=4) == expected
    shakespeare = perplexity(model, "shakespeare", tokenizer=tokenizer, max_blocks=2)  # a dataset's test split
    assert shakespeare == perplexity(model, load_text("shakespeare", "test"), tokenizer=tokenizer, max_blocks=2)
    assert read_text_file(text_file) == text


def test_text_errors_are_one_clear_data_error(tmp_path, lm, tiny):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        parse_source(f"text:{empty}")
    with pytest.raises(DataError, match="is empty"):
        perplexity(lm[0], empty, tokenizer=tiny.tokenizer())
    with pytest.raises(DataError, match="does not exist"):
        parse_source(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(DataError, match="fewer than one block"):
        perplexity(lm[0], "two words", tokenizer=tiny.tokenizer())
    with pytest.raises(DataError, match="needs a tokenizer"):
        perplexity(lm[0], "some text")


def test_an_unknown_dataset_names_the_available_ones():
    with pytest.raises(DataError) as raised:
        parse_source("wikitext")
    assert all(name in str(raised.value) for name in list_datasets())


# -- accuracy ---------------------------------------------------------------------------------

def test_accuracy_of_a_dynamic_graph_from_batch_1_runs_at_batch_4(zoo_model):
    vit = zoo_model("vit-mnist")
    graph = at_batch_1(fxpress.capture(vit.module, vit.example_inputs, dynamic=True))
    with call_shapes(graph) as shapes:
        value = accuracy(graph, "mnist-5k", max_items=50, batch_size=4)
    assert shapes == [(4, 1, 28, 28)] * 12 + [(2, 1, 28, 28)]
    assert value == accuracy(vit.module, "mnist-5k", max_items=50) > 0.8


def test_accuracy_of_a_static_graph_uses_its_batch_and_checks_the_image_shape(zoo_model):
    cnn = zoo_model("cnn-digits")
    graph = fxpress.capture(cnn.module, cnn.example_inputs)  # static batch 2
    with call_shapes(graph) as shapes:
        value = accuracy(graph, "digits", max_items=51)
    assert shapes == [(2, 1, 8, 8)] * 26
    assert value == accuracy(cnn.module, "digits", max_items=51)
    with pytest.raises(DataError, match=r"\(1, 28, 28\) do not fit"):
        accuracy(graph, "mnist-5k")


def test_dynamic_capture_from_batch_1_evaluates_at_batch_4(zoo_model):
    """A real batch-1 capture with a dynamic batch (capture widens the size-1 dim torch would fix)."""
    vit = zoo_model("vit-mnist")
    graph = fxpress.capture(vit.module, (vit.example_inputs[0][:1],), dynamic=True)
    with call_shapes(graph) as shapes:
        accuracy(graph, "mnist-5k", max_items=8, batch_size=4)
    assert shapes == [(4, 1, 28, 28)] * 2


def test_accuracy_of_a_compiled_model_follows_its_signature(zoo_model):
    pytest.importorskip("onnxruntime")
    cnn = zoo_model("cnn-digits")
    graph = fxpress.capture(cnn.module, cnn.example_inputs, dynamic=True)
    static = fxpress.compile(graph, "onnx")
    dynamic = fxpress.compile(graph, "onnx", dynamic=True)
    assert fixed_dims(static) == [{0: 2, 1: 1, 2: 8, 3: 8}]
    assert fixed_dims(dynamic) == [{1: 1, 2: 8, 3: 8}]
    expected = accuracy(cnn.module, "digits", max_items=21)
    assert accuracy(static, "digits", max_items=21) == expected
    assert accuracy(dynamic, "digits", max_items=21, batch_size=4) == expected


def test_accuracy_of_a_bounded_compiled_model_runs_batches_within_its_bound(zoo_model):
    """A TVM build with max_sizes=8 refuses batches above 8: evaluation's default batch (256) is cut to 8,
    and asking for more is one clear DataError."""
    cnn = zoo_model("cnn-digits")
    graph = fxpress.capture(cnn.module, cnn.example_inputs, dynamic=True)
    bounded = fxpress.compile(graph, "llvm", dynamic=True, max_sizes=8)
    assert accuracy(bounded, "digits", max_items=21) == accuracy(cnn.module, "digits", max_items=21)
    with pytest.raises(DataError, match=r"batch of at most 8 \(compiled with max_sizes\)"):
        accuracy(bounded, "digits", max_items=21, batch_size=16)


# -- retrieval MRR ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(tiny):
    """(eager tiny encoder, dynamic graph at batch 1, static graph of shape (1, 32))."""
    model = tiny.tiny_encoder()
    batch = tiny.tokenizer()(["a query", "a longer document text"], padding="max_length", max_length=32,
                             return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    dynamic = fxpress.capture(model, inputs, dynamic={0: SEQ_DIMS, 1: SEQ_DIMS})
    static = fxpress.capture(model, tuple(x[:1] for x in inputs))
    return model, at_batch_1(dynamic), static


def test_mrr_of_dynamic_and_static_graphs_matches_eager(encoder, tiny):
    model, dynamic, static = encoder
    tokenizer = tiny.tokenizer()
    options = dict(split="all", max_items=10)
    with call_shapes(dynamic) as shapes:
        value = mrr(dynamic, tokenizer, "pydoc-topics", batch_size=4, **options)
    assert set(shapes) == {(4, 128)} and len(shapes) == 6  # 3 batches of queries, 3 of documents
    assert value == pytest.approx(mrr(model, tokenizer, "pydoc-topics", **options), abs=1e-9)
    with call_shapes(static) as shapes:
        value = mrr(static, tokenizer, "pydoc-topics", **options)
    assert set(shapes) == {(1, 32)} and len(shapes) == 20
    assert value == pytest.approx(mrr(model, tokenizer, "pydoc-topics", max_len=32, **options), abs=1e-9)
    assert 0 < value <= 1


# -- evaluate and calibration from sources ----------------------------------------------------

def test_evaluate_scores_a_source_that_fits_the_task(tiny, text_file, zoo_model):
    model = tiny.tiny_lm_zoo_model()
    metrics = evaluate(model, model.module, f"text:{text_file}", max_items=3)
    assert metrics == {"perplexity": perplexity(model.module, text_file, tokenizer=model.tokenizer, max_blocks=3)}
    with pytest.raises(DataError, match="does not fit tiny-lm, a causal-lm model"):
        evaluate(model, model.module, "mnist-5k")
    vit = zoo_model("vit-mnist")
    with pytest.raises(DataError, match="does not fit vit-mnist, a classification model"):
        evaluate(vit, vit.module, "shakespeare")
    with pytest.raises(DataError, match="does not fit"):
        evaluate(vit, vit.module, f"text:{text_file}")


def test_calibration_from_a_text_file_fits_the_graph(lm, tiny, text_file):
    model = tiny.tiny_lm_zoo_model()
    batches = calibration_batches(model, count=3, source=f"text:{text_file}")
    assert [tuple(ids.shape) for (ids,) in batches] == [(2, 64)] * 3
    static = lm[2]
    batches = calibration_batches(model, count=3, source=f"text:{text_file}", like=static)
    assert [tuple(ids.shape) for (ids,) in batches] == [(1, 16)] * 3
    first = text_blocks(model.tokenizer, text_file.read_text(encoding="utf-8"), 16, max_blocks=1)
    assert torch.equal(batches[0][0], first)


def test_a_model_without_what_its_metric_needs_is_a_data_error(tiny):
    custom = ZooModel(name="mine", module=torch.nn.Identity(), example_inputs=(torch.zeros(2, 3),),
                      description="user model", task="custom")
    assert evaluate(custom, custom.module) == {}  # nothing to score by default
    with pytest.raises(DataError, match="task 'custom' has no metric"):
        check_evaluable(custom)
    unnamed = ZooModel(name="unnamed", module=torch.nn.Identity(), example_inputs=(torch.zeros(2, 1, 8, 8),),
                       description="a classifier", task="classification")
    with pytest.raises(DataError, match="names no dataset"):
        check_evaluable(unnamed)
    check_evaluable(unnamed, "digits")
    lm = tiny.tiny_lm_zoo_model()
    lm.tokenizer = None
    with pytest.raises(DataError, match="has no tokenizer"):
        evaluate(lm, lm.module, "shakespeare")


def test_classifier_calibration_spans_every_label_of_a_sorted_split():
    """mnist-5k's training rows are sorted by label: the first 4 batches of 32 were all digit 0, so a
    codebook or Hessian fitted on them saw one class.  Each batch now spans the split."""
    from fxpress.zoo import load_model
    from fxpress.zoo.datasets import load_dataset

    model = load_model("vit-mnist")
    split = load_dataset(model.dataset, "train")
    assert torch.equal(split.labels[:32], torch.zeros(32, dtype=split.labels.dtype))  # why this matters
    batches = calibration_batches(model, count=4, batch_size=32)
    assert [tuple(images.shape) for (images,) in batches] == [(32, 1, 28, 28)] * 4
    rows = {tuple(image.flatten().tolist()): label for image, label in zip(split.images, split.labels.tolist())}
    for (images,) in batches:
        labels = {rows[tuple(image.flatten().tolist())] for image in images}
        assert labels == set(range(10))
    first = torch.cat([images for (images,) in batches])
    assert len({tuple(image.flatten().tolist()) for image in first}) == 128  # no image twice
