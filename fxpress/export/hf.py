"""Save a compressed graph (depth or width): as a Hugging Face model folder, or as deduplicated weights.

``export_hf(graph, source, folder)`` rebuilds the Hugging Face model the
graph was captured from (``source``: the captured module, e.g. a zoo
wrapper whose ``model`` attribute is the ``PreTrainedModel``) with
``num_hidden_layers`` set to the graph's remaining blocks, its state dict
renamed (block k of the compressed graph <- the kept block it came from)
and ``save_pretrained`` into ``folder``; ``transformers`` reloads it and
gives the graph's outputs.  Width pruning (``prune-width``) shows in the
tensors' shapes: ``hidden_size``, ``intermediate_size``,
``num_attention_heads`` and ``num_key_value_heads`` are read off them.  Tensors the graph does not read (a pooler,
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


# Where a config's width fields can be read off the tensors (names relative to a block, or anywhere for embeddings).
_EMBEDDINGS = ("embed_tokens.weight", "word_embeddings.weight")
_MLP_IN = ("mlp.up_proj.weight", "intermediate.dense.weight", "mlp.fc1.weight")
_QUERY = ("self_attn.q_proj.weight", "attention.self.query.weight")
_KEY = ("self_attn.k_proj.weight", "attention.self.key.weight")


def _rows(blocks: list[dict[str, torch.Tensor]], names: tuple[str, ...]) -> int | None:
    """The common output size of the first matching tensor of every block (ArtifactError if they differ)."""
    sizes = {next((t.shape[0] for n, t in b.items() if n in names), None) for b in blocks}
    sizes.discard(None)
    if len(sizes) > 1:
        raise ArtifactError(f"blocks have different {names[0]} widths {sorted(sizes)}; a Hugging Face config "
                            "holds one width for every layer")
    return sizes.pop() if sizes else None


def _set_widths(config: Any, original: Any, blocks: list[dict[str, torch.Tensor]],
                tensors: dict[str, torch.Tensor]) -> None:
    """hidden_size, intermediate_size, num_attention_heads, num_key_value_heads from the pruned tensors."""
    heads = getattr(original, "num_attention_heads", None)
    head_dim = getattr(original, "head_dim", None) or (original.hidden_size // heads if heads else None)
    embedding = next((t for n, t in tensors.items() if n.endswith(_EMBEDDINGS) and t.dim() == 2), None)
    if embedding is not None:
        config.hidden_size = int(embedding.shape[1])
    intermediate = _rows(blocks, _MLP_IN)
    if intermediate is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = int(intermediate)
    query, key = _rows(blocks, _QUERY), _rows(blocks, _KEY)
    if head_dim and query is not None:
        config.num_attention_heads = int(query // head_dim)
        if hasattr(original, "num_key_value_heads") and key is not None:
            config.num_key_value_heads = int(key // head_dim)
        if hasattr(original, "head_dim"):
            config.head_dim = int(head_dim)
        elif config.num_attention_heads * head_dim != config.hidden_size:
            raise ArtifactError(f"{type(original).__name__} derives the head size from hidden_size / "
                                f"num_attention_heads, so {config.num_attention_heads} heads of {head_dim} "
                                f"beside hidden size {config.hidden_size} cannot be written; export models with "
                                "pruned heads from configs that have head_dim (LLaMA-style)")


def _new_config(hf: Any, stack: BlockStack, blocks: list[dict[str, torch.Tensor]] | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> Any:
    config = copy.deepcopy(hf.config)
    config.num_hidden_layers = len(stack)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == hf.config.num_hidden_layers:
        config.layer_types = [layer_types[b.label] for b in stack.blocks]
    if blocks is not None:
        _set_widths(config, hf.config, blocks, tensors or {})
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
    config = _new_config(hf, stack, blocks, graph_tensors)
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
