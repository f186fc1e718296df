"""The stdlib-docs retrieval set: large enough, split by name hash, disjoint, deterministic, cached."""
from __future__ import annotations

import json

import pytest
import torch

from fxpress.errors import ZooError
from fxpress.zoo import datasets, list_datasets, load_dataset

torch.set_num_threads(1)


def test_stdlib_docs_is_listed_and_large_enough_to_compare_methods():
    assert "stdlib-docs" in list_datasets()
    train, test = load_dataset("stdlib-docs", "train"), load_dataset("stdlib-docs", "test")
    assert len(test) >= 1000 and len(train) >= 2000
    assert len(load_dataset("stdlib-docs", "all")) == len(train) + len(test)


def test_the_split_is_disjoint_in_queries_and_documents():
    train, test = load_dataset("stdlib-docs", "train"), load_dataset("stdlib-docs", "test")
    assert not set(train.titles) & set(test.titles)
    assert not set(train.texts) & set(test.texts)
    everything = load_dataset("stdlib-docs", "all")
    assert len(set(everything.titles)) == len(set(everything.texts)) == len(everything)


def test_each_item_sits_on_the_side_its_name_hash_says_in_hash_order():
    test = load_dataset("stdlib-docs", "test")
    assert all(datasets.stdlib_docs_split(name) == "test" for name in test.titles)
    hashes = [datasets._name_hash(name) for name in test.titles]
    assert hashes == sorted(hashes)
    assert all(len(doc) >= datasets.MIN_DOC_CHARS for doc in test.texts)


def test_a_fresh_build_gives_the_same_pairs():
    built = sorted(datasets._build_stdlib_docs(), key=lambda pair: (datasets._name_hash(pair[0]), pair[0]))
    assert tuple(built) == datasets._stdlib_docs_pairs()


def test_max_items_takes_a_prefix():
    test = load_dataset("stdlib-docs", "test")
    few = load_dataset("stdlib-docs", "test", max_items=7)
    assert few.titles == test.titles[:7] and few.texts == test.texts[:7]
    assert len(load_dataset("digits", "test", max_items=5).labels) == 5
    with pytest.raises(ZooError, match="max_items"):
        load_dataset("stdlib-docs", "test", max_items=0)


def test_pairs_are_cached_per_python_version_and_read_back(tmp_path, monkeypatch):
    expected = datasets._stdlib_docs_pairs()
    monkeypatch.setenv("FXPRESS_CACHE", str(tmp_path))
    datasets._stdlib_docs_pairs.cache_clear()
    try:
        assert datasets._stdlib_docs_pairs() == expected
        (path,) = (tmp_path / "datasets").glob("stdlib-docs-*.json")
        assert json.loads(path.read_text())["python"]

        def no_build():
            raise AssertionError("the cached pairs should have been read")

        monkeypatch.setattr(datasets, "_build_stdlib_docs", no_build)
        datasets._stdlib_docs_pairs.cache_clear()
        assert datasets._stdlib_docs_pairs() == expected
    finally:
        datasets._stdlib_docs_pairs.cache_clear()
