"""Your own Hugging Face model as a ZooModel: ``from_pretrained(path, task=...)``.

``path`` is a local model folder (``config.json`` + weights, as
``save_pretrained`` writes it) or a GGUF file.  The model is loaded
offline in float32 and eval mode, wrapped by
:func:`fxpress.zoo.hf_wrap.wrap_pretrained` (named inputs, cache off, one
output tensor), and given example inputs: the sentences every zoo model
uses, tokenized by the folder's tokenizer (random token ids when it has
none), or a random image batch for vision models.  The task comes from
the config's architecture name unless given:

- ``causal-lm`` (``*ForCausalLM``): logits; perplexity needs a tokenizer.
- ``classification`` (``*ForSequenceClassification``, ``*ForImageClassification``): logits.
- ``embedding`` (a bare ``*Model``: BERT, ViT ...): ``last_hidden_state``.

A GGUF file is de-quantized to float32 on load, and the GGUF quantization
settings are dropped from the config: the weights are plain floats now.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from torch import nn

from fxpress.errors import CaptureError, ZooError, first_line
from fxpress.zoo import hf, packages
from fxpress.zoo.hf_wrap import TOKEN_INPUTS, wrap_pretrained
from fxpress.zoo.models import EXAMPLE_SENTENCES, MAX_BATCH, TASKS, ZooModel

log = logging.getLogger(__name__)

EXAMPLE_SEQ = 8  # token ids per example row when the folder has no tokenizer


def from_pretrained(path: str | Path, task: str | None = None, output: str | None = None) -> ZooModel:
    """Load the Hugging Face model at ``path`` (folder or .gguf file) as a ZooModel; see the module doc."""
    path = Path(path).expanduser()
    if task is not None and task not in TASKS:
        raise ZooError(f"unknown task '{task}' for {path}; tasks: {', '.join(TASKS)}")
    hf._prepare_transformers(f"loading {path}")
    config = _load_config(path)
    task = task or _task_of(config, path)
    model = _load_model(path, config, task)
    tokenizer = _load_tokenizer(path)
    inputs = _example_inputs(model, config, tokenizer)
    try:
        wrapped = wrap_pretrained(model, inputs, output)
    except CaptureError as err:
        raise ZooError(f"{path}: {err}") from err
    name = path.stem if path.is_file() else path.name
    ranges = {"batch": (1, MAX_BATCH)}
    if any("seq" in dims.values() for dims in wrapped.dynamic_dims.values()):
        ranges["seq"] = (1, int(getattr(config, "max_position_embeddings", 0) or 512))
    return ZooModel(name=name, module=wrapped.module, example_inputs=wrapped.inputs,
                    description=f"{type(model).__name__} from {path}, called as {wrapped.description}",
                    task=task, dynamic_dims=wrapped.dynamic_dims, dim_ranges=ranges, tokenizer=tokenizer,
                    meta={"source": str(path), "wrapper": wrapped.description})


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _load_config(path: Path):
    from transformers import AutoConfig

    if _is_gguf(path):
        if not path.is_file():
            raise ZooError(f"GGUF file {path} does not exist")
        packages.require((packages.GGUF,), f"loading {path.name}")
        try:
            with hf._quiet_progress():
                return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds for unreadable GGUF
            raise ZooError(f"transformers cannot load {path.name}: {_reason(err)}; it reads the GGUF "
                           "architectures listed in transformers.integrations.ggml") from err
    if not path.is_dir():
        raise ZooError(f"model {path} does not exist; give a zoo name, a Hugging Face model folder "
                       "or a .gguf file")
    if not (path / "config.json").is_file():
        raise ZooError(f"{path} has no config.json, so it is not a Hugging Face model folder; write one with "
                       "model.save_pretrained(folder)")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise ZooError(f"transformers cannot read {path / 'config.json'}: {_reason(err)}") from err


def _reason(err: BaseException) -> str:
    return first_line(err).rstrip(".") or type(err).__name__


def _task_of(config, path: Path) -> str:
    architectures = getattr(config, "architectures", None) or []
    name = architectures[0] if architectures else ""
    if name.endswith("ForCausalLM") or (_is_gguf(path) and not name):
        return "causal-lm"
    if name.endswith(("ForSequenceClassification", "ForImageClassification")):
        return "classification"
    if name.endswith("Model") or not name:
        return "embedding"
    raise ZooError(f"{path}: cannot tell the task of a {name}; pass task= one of {', '.join(TASKS)} "
                   "(fxpress.zoo.from_pretrained(path, task=...))")


def _is_vision(config) -> bool:
    return hasattr(config, "image_size") and hasattr(config, "num_channels")


def _load_model(path: Path, config, task: str) -> nn.Module:
    import transformers

    if task == "causal-lm":
        cls = transformers.AutoModelForCausalLM
    elif task == "classification":
        cls = (transformers.AutoModelForImageClassification if _is_vision(config)
               else transformers.AutoModelForSequenceClassification)
    else:
        cls = transformers.AutoModel
    where, extra = (path.parent, {"gguf_file": path.name}) if _is_gguf(path) else (path, {})
    try:
        with hf._quiet_progress():
            model = cls.from_pretrained(where, dtype=torch.float32, **extra)
    except Exception as err:  # noqa: BLE001
        raise ZooError(f"transformers cannot load {path} as a {task} model ({cls.__name__}): {_reason(err)}") from err
    if _is_gguf(path):
        hf._forget_gguf_quantization(model)
    return model.eval()


def _load_tokenizer(path: Path):
    folder = path.parent if _is_gguf(path) else path
    has_files = _is_gguf(path) or any((folder / f).is_file() for f in
                                      ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model"))
    if not has_files:
        return None
    from transformers import AutoTokenizer

    extra = {"gguf_file": path.name} if _is_gguf(path) else {}
    try:
        with hf._quiet_progress():
            return AutoTokenizer.from_pretrained(folder, **extra)
    except Exception as err:  # noqa: BLE001 - a model without a usable tokenizer still captures
        log.warning("%s: no usable tokenizer (%s); example inputs are random token ids", path, _reason(err))
        return None


def _example_inputs(model: nn.Module, config, tokenizer) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if model.main_input_name == "pixel_values":
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(2, config.num_channels, size, size, generator=generator)}
    if tokenizer is not None:
        rows = [tokenizer.encode(s) for s in EXAMPLE_SENTENCES]
        length = min(len(r) for r in rows)
        ids = torch.tensor([r[:length] for r in rows], dtype=torch.int64)
    else:
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        if vocab <= 0:
            raise ZooError(f"{type(model).__name__} has neither a tokenizer nor a vocab_size to make example inputs")
        ids = torch.randint(0, vocab, (2, EXAMPLE_SEQ), generator=generator)
    inputs = {"input_ids": ids}
    if "attention_mask" in _forward_inputs(model) and model.config.model_type in _MASKED_ENCODERS:
        inputs["attention_mask"] = torch.ones_like(ids)
    return inputs


# Encoders whose users pass an attention mask (padding): it becomes a graph input.
_MASKED_ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet")


def _forward_inputs(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters) & set(TOKEN_INPUTS)

