"""The model zoo: built-in offline models by name.

================  ===============  =========================================
name              task             what
================  ===============  =========================================
``bnn-digits``    classification   XNOR-Net binary CNN, sklearn digits 8x8
``cnn-digits``    classification   float Conv+BN+ReLU CNN, sklearn digits
``gdnet-lite``    depth-sr         RGB-guided x4 depth super-resolution,
                                   Middlebury Motorcycle (scikit-image)
``minilm``        embedding        all-MiniLM-L6-v2 BERT encoder (22.7M)
``smollm2``       causal-lm        SmolLM2-135M-Instruct LLaMA decoder
``vit-mnist``     classification   4-block ViT, 49 patches + CLS, MNIST-5k
================  ===============  =========================================

The three small classifiers and gdnet-lite are trained here and shipped
as fixtures (``fxpress/zoo/fixtures``); their ``metrics`` are the
accuracies (gdnet-lite: RMSE in mm, and bicubic's) recorded on the
held-out "test" split of their dataset.  The two language models
come from offline packages (see :mod:`fxpress.zoo.hf`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fxpress.errors import ZooError
from fxpress.zoo import hf
from fxpress.zoo.bnn import BinaryDigitsNet
from fxpress.zoo.cnn import DigitsCNN
from fxpress.zoo.datasets import load_dataset
from fxpress.zoo.fixture_io import load_fixture
from fxpress.zoo.gdnet import DATASET as DEPTH_DATASET, GDNetLite
from fxpress.zoo.vit import ViTConfig, VisionTransformer

log = logging.getLogger(__name__)

TASKS = ("classification", "embedding", "causal-lm")
MAX_BATCH = 1024
EXAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A compiler rewrites models into smaller, faster programs.",
)


@dataclass
class ZooModel:
    """A loaded zoo model and everything needed to capture and check it.

    ``module`` is float32 and in eval mode.  ``example_inputs`` is a
    small batch (2) to call it with: ``module(*example_inputs)`` returns
    one tensor.  ``dynamic_dims`` maps input index -> {dim: name} for the
    dims that may vary, ``dim_ranges`` maps each name to its (min, max);
    :meth:`dynamic_shapes` turns both into ``torch.export.Dim``s.  ``dataset`` names the
    zoo dataset the model was trained/evaluated on, if any; ``metrics``
    are the recorded results on its "test" split; ``meta`` is the
    fixture's full JSON record.
    """

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    description: str
    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    dynamic_dims: dict[int, dict[int, str]] = field(default_factory=dict)
    dim_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    tokenizer: object | None = None
    dataset: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """Distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.module.parameters())

    def dynamic_shapes(self) -> tuple[dict[int, torch.export.Dim], ...]:
        """``dynamic_shapes`` for ``torch.export.export(module, example_inputs, ...)``.

        One ``Dim`` per name, shared by every input that uses it.
        """
        dims = {name: torch.export.Dim(name.replace("-", "_"), min=low, max=high)
                for name, (low, high) in self.dim_ranges.items()}
        return tuple({axis: dims[name] for axis, name in self.dynamic_dims.get(index, {}).items()}
                     for index in range(len(self.example_inputs)))


@dataclass(frozen=True)
class _Entry:
    description: str
    loader: Callable[[], ZooModel]


def _fixture_model(name: str, build: Callable[[dict], nn.Module], script: str,
                   dataset: str, description: str) -> ZooModel:
    """Build a fixture's module from its JSON config and load its weights."""
    state, meta = load_fixture(name, script)
    module = build(meta["config"])
    module.load_state_dict(state)
    module.float().eval()
    images = load_dataset(dataset, "test").images[:2].clone()
    return ZooModel(name=name, module=module, example_inputs=(images,), description=description,
                    task="classification", metrics=dict(meta.get("metrics", {})),
                    dynamic_dims={0: {0: "batch"}}, dim_ranges={"batch": (1, MAX_BATCH)},
                    dataset=dataset, meta=meta)


def _load_vit_mnist() -> ZooModel:
    return _fixture_model("vit-mnist", lambda c: VisionTransformer(ViTConfig(**c)),
                          "scripts/train_vit_mnist.py", "mnist-5k", _ENTRIES["vit-mnist"].description)


def _load_bnn_digits() -> ZooModel:
    return _fixture_model("bnn-digits", lambda c: BinaryDigitsNet(**c),
                          "scripts/train_bnn_digits.py", "digits", _ENTRIES["bnn-digits"].description)


def _load_cnn_digits() -> ZooModel:
    return _fixture_model("cnn-digits", lambda c: DigitsCNN(**c),
                          "scripts/train_cnn_digits.py", "digits", _ENTRIES["cnn-digits"].description)


def _load_gdnet_lite() -> ZooModel:
    state, meta = load_fixture("gdnet-lite", "scripts/train_gdnet_lite.py")
    module = GDNetLite(**meta["config"])
    module.load_state_dict(state)
    module.float().eval()
    tiles = load_dataset(DEPTH_DATASET, "test")
    batch = {0: "batch"}
    return ZooModel(name="gdnet-lite", module=module, example_inputs=(tiles.rgb[:2].clone(), tiles.lr[:2].clone()),
                    description=_ENTRIES["gdnet-lite"].description, task="depth-sr",
                    metrics=dict(meta.get("metrics", {})), dynamic_dims={0: dict(batch), 1: dict(batch)},
                    dim_ranges={"batch": (1, MAX_BATCH)}, dataset=DEPTH_DATASET, meta=meta)


def _max_positions(wrapper: nn.Module) -> int:
    """Longest sequence the wrapped HF model's position embeddings allow."""
    return int(wrapper.model.config.max_position_embeddings)


def _load_minilm() -> ZooModel:
    module, tokenizer = hf.load_minilm()
    batch = tokenizer(list(EXAMPLE_SENTENCES), padding=True, return_tensors="pt")
    inputs = (batch["input_ids"].to(torch.int64), batch["attention_mask"].to(torch.int64))
    seq_dims = {0: "batch", 1: "seq"}
    return ZooModel(name="minilm", module=module, example_inputs=inputs,
                    description=_ENTRIES["minilm"].description, task="embedding",
                    dynamic_dims={0: dict(seq_dims), 1: dict(seq_dims)},
                    dim_ranges={"batch": (1, MAX_BATCH), "seq": (1, _max_positions(module))},
                    tokenizer=tokenizer)


def _load_smollm2() -> ZooModel:
    module, tokenizer = hf.load_smollm2()
    ids = [tokenizer.encode(s, add_special_tokens=False) for s in EXAMPLE_SENTENCES]
    length = min(len(i) for i in ids)
    input_ids = torch.tensor([i[:length] for i in ids], dtype=torch.int64)
    return ZooModel(name="smollm2", module=module, example_inputs=(input_ids,),
                    description=_ENTRIES["smollm2"].description, task="causal-lm",
                    dynamic_dims={0: {0: "batch", 1: "seq"}},
                    dim_ranges={"batch": (1, MAX_BATCH), "seq": (1, _max_positions(module))},
                    tokenizer=tokenizer)


_ENTRIES: dict[str, _Entry] = {
    "bnn-digits": _Entry("XNOR-Net binary CNN (float first conv and classifier) on sklearn digits 8x8",
                         _load_bnn_digits),
    "cnn-digits": _Entry("float CNN (Conv2d+BatchNorm+ReLU, Linear+BatchNorm1d head) on sklearn digits 8x8",
                         _load_cnn_digits),
    "gdnet-lite": _Entry("GDNet reconstructed from its paper, CPU-sized (Conv+BatchNorm, low-rank global branch): "
                         "RGB-guided x4 depth super-resolution, (rgb 64x64, depth 16x16 mm) -> depth 64x64 mm",
                         _load_gdnet_lite),
    "minilm": _Entry("all-MiniLM-L6-v2 BERT sentence encoder (6 layers, 22.7M params); returns last_hidden_state",
                     _load_minilm),
    "smollm2": _Entry("SmolLM2-135M-Instruct LLaMA decoder (30 layers, GQA 9/3), from Q4_1 GGUF; returns logits",
                      _load_smollm2),
    "vit-mnist": _Entry("4-block ViT (dim 64, 4 heads, 4x4 patches: 49 tokens + CLS) on MNIST-5k 28x28",
                        _load_vit_mnist),
}


def list_models() -> list[str]:
    """Names accepted by :func:`load_model`, sorted."""
    return sorted(_ENTRIES)


def describe_models() -> dict[str, str]:
    """Model name -> one-line description, without loading anything."""
    return {name: _ENTRIES[name].description for name in list_models()}


def load_model(name: str) -> ZooModel:
    """Load zoo model ``name`` (float32, eval mode) with its example inputs.

    Raises ZooError for an unknown name, a missing package (naming the
    ``pip install`` command) or a missing fixture.
    """
    entry = _ENTRIES.get(name)
    if entry is None:
        raise ZooError(f"unknown model '{name}'; available models: {', '.join(list_models())}")
    start = time.perf_counter()
    model = entry.loader()
    log.info("loaded zoo model %s: %d params in %.2f s", name, model.num_params, time.perf_counter() - start)
    return model
