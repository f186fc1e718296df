"""Save a depth-compressed graph: as a Hugging Face model folder, or as deduplicated weights.

``export_hf(graph, source, folder)`` rebuilds the Hugging Face model the
graph was captured from (``source``: the captured module, e.g. a zoo
wrapper whose ``model`` attribute is the ``PreTrainedModel``) with
``num_hidden_layers`` set to the graph's remaining blocks, its state dict
renamed (block k of the compressed graph <- the kept block it came from)
and ``save_pretrained`` into ``folder``; ``transformers`` reloads it and
gives the graph's outputs.  Tensors the graph does not read (a pooler,
non-persistent buffers) come from ``source``.  Hugging Face configs
cannot say "layer 3 reuses layer 2's weights", so weights shared by
``share-weights`` are written once per layer in this format (untied).

``save_weights(graph, path)`` writes the tensors the graph reads to one
safetensors file, each distinct tensor once (shared weights stay shared
on disk), with the other attribute paths as aliases in the metadata;
``load_weights`` restores them with the sharing.
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
from pathlib import Path
from typing import Any

import torch

from fxpress.errors import ArtifactError
from fxpress.ir.graph import Graph
from fxpress.analysis.blocks import BlockStack, find_blocks

ALIASES_KEY = "fxpress_aliases"


def find_hf_model(source: torch.nn.Module) -> tuple[str, Any]:
    """(attribute path, model) of the first transformers PreTrainedModel in `source` (itself included)."""
    from transformers import PreTrainedModel

    for path, module in source.named_modules():
        if isinstance(module, PreTrainedModel):
            return path, module
    raise ArtifactError(f"{type(source).__name__} holds no transformers PreTrainedModel to export")


def _block_tensors(graph: Graph, stack: BlockStack) -> list[dict[str, torch.Tensor]]:
    """Per kept block: name relative to its layer (`self_attn.q_proj.weight`) -> tensor it reads."""
    pattern = re.compile(re.escape(stack.prefix + ".") + r"\d+\.(.+)" if stack.prefix else r"\d+\.(.+)")
    nodes = {n.name: n for n in graph.fx.nodes}
    found = []
    for block in stack.blocks:
        tensors = {}
        for name in block.nodes:
            for arg in nodes[name].all_input_nodes:
                match = pattern.fullmatch(str(arg.target)) if arg.op == "get_attr" else None
                if match:
                    tensors[match.group(1)] = graph.attribute(str(arg.target))
        found.append(tensors)
    return found


def _new_config(hf: Any, stack: BlockStack) -> Any:
    config = copy.deepcopy(hf.config)
    config.num_hidden_layers = len(stack)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == hf.config.num_hidden_layers:
        config.layer_types = [layer_types[b.label] for b in stack.blocks]
    return config


def compressed_state_dict(graph: Graph, source: torch.nn.Module) -> tuple[Any, dict[str, torch.Tensor], Any]:
    """(Hugging Face model class, new config, renamed state dict) for the compressed graph."""
    wrapper_path, hf = find_hf_model(source)
    stack = find_blocks(graph)
    outer = f"{wrapper_path}." if wrapper_path else ""
    if stack is None or not stack.prefix.startswith(outer):
        raise ArtifactError(f"{graph.name}: no residual blocks under {wrapper_path or 'the model'} to export")
    container = stack.prefix[len(outer):]
    blocks = _block_tensors(graph, stack)
    original = hf.state_dict()
    graph_tensors = graph.referenced_tensors()
    config = _new_config(hf, stack)
    state: dict[str, torch.Tensor] = {}
    layer = re.compile(re.escape(container) + r"\.\d+\.")
    for key, value in original.items():
        if layer.match(key) is None:
            state[key] = graph_tensors.get(outer + key, value)
    for k, block in enumerate(stack.blocks):
        own = f"{container}.{block.label}."
        for key, value in original.items():
            if key.startswith(own):
                rest = key[len(own):]
                state[f"{container}.{k}.{rest}"] = blocks[k].get(rest, value)
    return type(hf), config, {k: v.detach().clone().contiguous() for k, v in state.items()}


def export_hf(graph: Graph, source: torch.nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write the compressed graph as a Hugging Face model folder (config + safetensors)."""
    cls, config, state = compressed_state_dict(graph, source)
    model = cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"exporting {graph.name}: state dict mismatch (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    folder = Path(folder)
    with _quiet_transformers():
        model.eval().save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def _quiet_transformers():
    """Keep transformers' progress bars off the terminal (library code does not print)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_hf(folder: str | Path, cls: Any = None) -> Any:
    """Reload an exported folder (with `cls`, or the class its config names) in eval mode."""
    if cls is None:
        from transformers import AutoModel as cls
    with _quiet_transformers():
        return cls.from_pretrained(folder, dtype=torch.float32).eval()


def save_weights(graph: Graph, path: str | Path) -> int:
    """Write every tensor the graph reads once (by identity) to a safetensors file; returns its bytes."""
    from safetensors.torch import save_file

    stored: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in sorted(graph.referenced_tensors().items()):
        if id(tensor) in stored:
            aliases[name] = stored[id(tensor)]
            continue
        stored[id(tensor)] = name
        tensors[name] = tensor.detach().contiguous()
    path = Path(path)
    save_file(tensors, str(path), metadata={ALIASES_KEY: json.dumps(aliases, sort_keys=True)})
    return path.stat().st_size


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Attribute path -> tensor, aliases resolved to the same tensor object."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get(ALIASES_KEY, "{}"))
    tensors = load_file(str(path))
    for alias, stored in aliases.items():
        tensors[alias] = tensors[stored]
    return tensors
