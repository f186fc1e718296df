"""Where evaluation and calibration data come from: a text file, a zoo dataset, or the model's own task.

A *source* is written as text, the same in Python and on the command line:

===================  ========================================================
``default``          the model's own task data (``fxpress.eval.evaluate``'s
                     choice: held-out images, pydoc topics, stdlib-docs)
``text:FILE``        a UTF-8 text file (perplexity and calibration of causal
                     LMs); an empty or missing file is a DataError
dataset name         a zoo dataset (``fxpress.zoo.list_datasets()``):
                     ``digits``, ``mnist-5k`` (images: accuracy),
                     ``shakespeare``, ``pydoc-topics``, ``stdlib-docs``
                     (text: perplexity; pairs: retrieval MRR),
                     ``motorcycle-depth`` (depth tiles: RMSE in mm)
===================  ========================================================

``parse_source`` checks the text (the file exists and has text, the
dataset exists) without loading a model; ``check_fits`` then says whether
a source suits a model's task.  ``METRIC_GOAL`` says which way each task
metric improves: accuracy and MRR up, perplexity and depth RMSE down.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fxpress.errors import DataError
from fxpress.zoo import TextDataset, list_datasets, load_dataset
from fxpress.zoo.gdnet import DATASET as DEPTH_DATASET

DEFAULT = "default"
TEXT_PREFIX = "text:"
IMAGE_DATASETS = ("digits", "mnist-5k")
RETRIEVAL_DATASETS = ("stdlib-docs", "pydoc-topics")
DEPTH_DATASETS = (DEPTH_DATASET,)
NOT_TEXT = IMAGE_DATASETS + DEPTH_DATASETS
METRIC_OF_TASK = {"classification": "accuracy", "causal-lm": "perplexity", "embedding": "mrr",
                  "depth-sr": "rmse_mm"}
# "max" or "min": which way each metric `evaluate` returns improves (rmse_mm: depth error in mm).
METRIC_GOAL = {"accuracy": "max", "mrr": "max", "perplexity": "min", "rmse_mm": "min", "bicubic_rmse_mm": "min"}


@dataclass(frozen=True)
class Source:
    """A parsed source: ``kind`` is "default", "text" (``value`` is the file) or "dataset" (its name)."""

    kind: str
    value: str = ""

    def __str__(self) -> str:
        return {"default": DEFAULT, "text": f"{TEXT_PREFIX}{self.value}"}.get(self.kind, self.value)

    @property
    def is_images(self) -> bool:
        return self.kind == "dataset" and self.value in IMAGE_DATASETS

    @property
    def is_depth(self) -> bool:
        return self.kind == "dataset" and self.value in DEPTH_DATASETS


def parse_source(spec: str | Source) -> Source:
    """Check and parse ``default``, ``text:FILE`` or a dataset name (DataError naming the choices)."""
    if isinstance(spec, Source):
        return spec
    text = spec.strip()
    if text == DEFAULT:
        return Source("default")
    if text.startswith(TEXT_PREFIX):
        path = text[len(TEXT_PREFIX):]
        read_text_file(path)  # fail now, before a model is loaded, on a missing or empty file
        return Source("text", path)
    if text in list_datasets():
        return Source("dataset", text)
    raise DataError(f"unknown data source {text!r}; use {DEFAULT}, {TEXT_PREFIX}FILE or a dataset: "
                    f"{', '.join(list_datasets())}")


def read_text_file(path: str | Path) -> str:
    """The text of a UTF-8 file; DataError if it is missing, unreadable, not UTF-8 or has no text."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"text file {path} is not UTF-8 text: {err.reason} at byte {err.start}") from err
    except OSError as err:
        raise DataError(f"cannot read text file {path}: {err.strerror or err}") from err
    if not text.strip():
        raise DataError(f"text file {path} is empty: evaluation and calibration need text")
    return text


def load_text(spec: str | Source, split: str = "test") -> str:
    """All text of a source: the file's, or a text dataset's `split` documents joined by blank lines."""
    source = parse_source(spec)
    if source.kind == "text":
        return read_text_file(source.value)
    if source.kind == "dataset":
        dataset = load_dataset(source.value, split)
        if isinstance(dataset, TextDataset):
            return dataset.text
    raise DataError(f"{source} is not text: use {TEXT_PREFIX}FILE or a text dataset "
                    f"({', '.join(d for d in list_datasets() if d not in NOT_TEXT)})")


def check_fits(source: Source, task: str, model_name: str, purpose: str = "evaluation") -> None:
    """DataError unless `source` can score (or calibrate) a model of `task`."""
    if task not in METRIC_OF_TASK:
        raise DataError(f"{purpose} of {model_name}: task {task!r} has no metric; fxpress evaluates "
                        f"{', '.join(METRIC_OF_TASK)} models (a factory can return a ZooModel with one)")
    if source.kind == "default":
        return
    fits = {"classification": source.is_images,
            "causal-lm": source.kind == "text" or (source.kind == "dataset" and source.value not in NOT_TEXT),
            "embedding": source.kind == "dataset" and source.value in RETRIEVAL_DATASETS,
            "depth-sr": source.is_depth}[task]
    if not fits:
        wanted = {"classification": f"an image dataset ({', '.join(IMAGE_DATASETS)})",
                  "causal-lm": f"{TEXT_PREFIX}FILE or a text dataset",
                  "embedding": f"a retrieval dataset ({', '.join(RETRIEVAL_DATASETS)})",
                  "depth-sr": f"a depth dataset ({', '.join(DEPTH_DATASETS)})"}[task]
        raise DataError(f"{purpose} data {source} does not fit {model_name}, a {task} model "
                        f"({METRIC_OF_TASK[task]}): use {DEFAULT} or {wanted}")


def metric_goal(metric: str) -> str:
    """"max" or "min": which way `metric` (a key of `evaluate`'s result) improves; DataError if unknown."""
    goal = METRIC_GOAL.get(metric)
    if goal is None:
        raise DataError(f"unknown metric {metric!r}; metrics: {', '.join(sorted(METRIC_GOAL))}")
    return goal
