"""Save a compressed graph: as a Hugging Face model folder, or as deduplicated weights.

``export_hf(graph, source, folder)`` rebuilds the Hugging Face model the
graph was captured from (``source``: the captured module, e.g. a zoo
wrapper whose ``model`` attribute is the ``PreTrainedModel``, or that
model itself when capture wrapped it) with ``num_hidden_layers`` set to
the graph's remaining blocks (and ``layer_types`` to theirs), its state
dict renamed (block k of the compressed graph <- the kept block it came
from) and ``save_pretrained`` into ``folder``; ``transformers`` reloads it
and gives the graph's outputs.  Width pruning (``prune-width``) shows in
the tensors' shapes: ``hidden_size`` (the blocks' stream width),
``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``
and ``head_dim`` are read off them.  Tensors the graph does not read (a
pooler, non-persistent buffers) come from ``source``.  Hugging Face
configs cannot say "layer 3 reuses layer 2's weights", so weights shared
by ``share-weights`` are written once per layer in this format (untied).
The folder holds plain float weights, so a ``quantization_config`` the
source carried (a model loaded from GGUF) is dropped.

A graph without a Hugging Face form is refused with one ArtifactError
line (:mod:`fxpress.export.hf_form`): custom ops (merge-tokens, binarize,
sparse-kernels), widths the config cannot hold (BERT's pruned heads), or a
rebuilt model whose outputs differ from the graph's.

``save_weights(graph, path)`` writes the tensors the graph reads to one
safetensors file, each distinct tensor once (shared weights stay shared
on disk), with the other attribute paths as aliases in the metadata;
``load_weights`` restores them with the sharing.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from fxpress.analysis.blocks import BlockStack, find_blocks
from fxpress.errors import ArtifactError
from fxpress.export.hf_form import INSTEAD, check_outputs, refuse_foreign_nodes
from fxpress.ir.graph import Graph

log = logging.getLogger(__name__)

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


# Where a config's width fields can be read off the tensors (names relative to a block).
_MLP_IN = ("mlp.up_proj.weight", "intermediate.dense.weight", "mlp.fc1.weight")
_QUERY = ("self_attn.q_proj.weight", "attention.self.query.weight", "attention.q_proj.weight")
_KEY = ("self_attn.k_proj.weight", "attention.self.key.weight", "attention.k_proj.weight")


def _rows(blocks: list[dict[str, torch.Tensor]], names: tuple[str, ...]) -> int | None:
    """The common output size of the first matching tensor of every block (ArtifactError if they differ)."""
    sizes = {next((t.shape[0] for n, t in b.items() if n in names), None) for b in blocks}
    sizes.discard(None)
    if len(sizes) > 1:
        raise ArtifactError(f"blocks have different {names[0]} widths {sorted(sizes)}; a Hugging Face config "
                            "holds one width for every layer")
    return sizes.pop() if sizes else None


def _head_dim(config: Any) -> int | None:
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)


def _set_widths(config: Any, original: Any, hidden: int | None, blocks: list[dict[str, torch.Tensor]]) -> None:
    """hidden_size (the blocks' stream width), intermediate_size, num_attention_heads, num_key_value_heads
    and, where heads times their size no longer make the hidden size, head_dim (read by LLaMA, Qwen2,
    Gemma, ViT; a config that derives the head size instead is refused when the model is built)."""
    head_dim = _head_dim(original)
    if hidden is not None:
        config.hidden_size = int(hidden)
    intermediate = _rows(blocks, _MLP_IN)
    if intermediate is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = int(intermediate)
    query, key = _rows(blocks, _QUERY), _rows(blocks, _KEY)
    if head_dim and query is not None:
        config.num_attention_heads = int(query // head_dim)
        if hasattr(original, "num_key_value_heads") and key is not None:
            config.num_key_value_heads = int(key // head_dim)
        if getattr(original, "head_dim", None) or config.num_attention_heads * head_dim != config.hidden_size:
            config.head_dim = int(head_dim)


def _new_config(hf: Any, stack: BlockStack, hidden: int | None, blocks: list[dict[str, torch.Tensor]]) -> Any:
    """The source config with the graph's depth and widths; without a quantization_config (see export_hf)."""
    config = copy.deepcopy(hf.config)
    config.num_hidden_layers = len(stack)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == hf.config.num_hidden_layers:
        config.layer_types = [layer_types[b.label] for b in stack.blocks]
    _set_widths(config, hf.config, hidden, blocks)
    if getattr(config, "quantization_config", None) is not None:
        log.info("dropping quantization_config %s: the export writes plain float weights",
                 _quant_method(config.quantization_config))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _quant_method(settings: Any) -> str:
    if isinstance(settings, dict):
        return str(settings.get("quant_method"))
    return str(getattr(settings, "quant_method", type(settings).__name__))


def _stream_width(graph: Graph, stack: BlockStack) -> int | None:
    """The width of the hidden stream entering the first block (hidden_size)."""
    entry = next(n for n in graph.fx.nodes if n.name == stack.blocks[0].input)
    shape = graph.info(entry).shape
    return int(shape[-1]) if shape else None


def locate_hf_model(graph: Graph, source: torch.nn.Module) -> tuple[str, Any, str]:
    """(attribute path of the PreTrainedModel in `source`, the model, how the graph's attribute paths start
    before the model's own names): the wrapper path, or `model.` for a bare model that capture wrapped."""
    wrapper_path, hf = find_hf_model(source)
    keys = set(hf.state_dict())
    names = list(graph.referenced_tensors())
    candidates = [f"{wrapper_path}." if wrapper_path else "", *([] if wrapper_path else ["model."])]
    outer = max(candidates, key=lambda c: sum(n.startswith(c) and n[len(c):] in keys for n in names))
    return wrapper_path, hf, outer


def compressed_state_dict(graph: Graph, source: torch.nn.Module) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """(Hugging Face model class, new config, renamed state dict) for the compressed graph."""
    wrapper_path, hf, outer = locate_hf_model(graph, source)
    stack = find_blocks(graph)
    if stack is None or not stack.prefix.startswith(outer):
        raise ArtifactError(f"{graph.name}: no residual blocks under {wrapper_path or 'the model'} to export")
    container = stack.prefix[len(outer):]
    blocks = _block_tensors(graph, stack)
    original = hf.state_dict()
    graph_tensors = graph.referenced_tensors()
    config = _new_config(hf, stack, _stream_width(graph, stack), blocks)
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


def _build(cls: Any, config: Any) -> Any:
    """`cls` built from `config` as `from_pretrained` will read it back (to_dict, from_dict: transformers
    validates it there); its refusal as an ArtifactError."""
    try:
        return cls(type(config).from_dict(config.to_dict()))
    except Exception as err:  # noqa: BLE001 - ValueError, or huggingface_hub's StrictDataclass errors
        cause = err.__cause__ or err
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ArtifactError(f"transformers refuses the compressed {type(config).__name__} "
                            f"({_widths(config)}): {first}; {INSTEAD}") from err


def _widths(config: Any) -> str:
    fields = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim")
    return ", ".join(f"{f}={getattr(config, f)}" for f in fields if getattr(config, f, None) is not None)


def _check_shapes(model: Any, state: dict[str, torch.Tensor], original: Any) -> None:
    """ArtifactError naming the first tensor whose shape the new config does not give."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            config = model.config
            heads = getattr(config, "num_attention_heads", None)
            pruned = heads != getattr(original, "num_attention_heads", None)
            derives = pruned and getattr(original, "head_dim", None) is None
            hint = (f"{type(original).__name__} derives the head size from hidden_size / num_attention_heads, "
                    f"so {heads} heads of {_head_dim(original)} beside hidden size "
                    f"{config.hidden_size} cannot be written; export models with pruned heads from configs "
                    "that have head_dim (LLaMA-style)") if derives else \
                f"{type(original).__name__} cannot express these widths ({_widths(config)})"
            raise ArtifactError(f"{hint}: {name} would be {list(own[name].shape)}, the graph's is "
                                f"{list(tensor.shape)}; {INSTEAD}")


def _recomputed_buffers(graph: Graph, outer: str, model: Any) -> str:
    """The first buffer the new config recomputes unlike the graph (Gemma's embedding scale after embed
    pruning), as `name is 5.66 in the graph, 4.9 from the config`; '' when none."""
    read = graph.referenced_tensors()
    for name, buffer in model.named_buffers():
        value = read.get(outer + name)
        if value is not None and value.shape == buffer.shape and not torch.equal(value, buffer):
            return (f"{name} is {float(value.flatten()[0]):.3g} in the graph, "
                    f"{float(buffer.flatten()[0]):.3g} from the config")
    return ""


def export_hf(graph: Graph, source: torch.nn.Module, folder: str | Path, tokenizer: Any = None,
              check: bool = True) -> Path:
    """Write the compressed graph as a Hugging Face model folder (config + safetensors).

    ArtifactError (one line) when the graph has no Hugging Face form: a node no transformers layer
    computes, widths the config cannot hold, or (with `check`) a rebuilt model whose outputs on the
    graph's example inputs differ from the graph's.
    """
    refuse_foreign_nodes(graph)
    cls, config, state = compressed_state_dict(graph, source)
    wrapper_path, hf, outer = locate_hf_model(graph, source)
    model = _build(cls, config)
    _check_shapes(model, state, hf.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"exporting {graph.name}: state dict mismatch (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    model.eval()
    if check:
        check_outputs(graph, source, wrapper_path, model, _recomputed_buffers(graph, outer, model))
    folder = Path(folder)
    with _quiet_transformers():
        try:
            model.save_pretrained(folder)
        except ValueError as err:
            raise ArtifactError(f"transformers cannot save the compressed {cls.__name__}: "
                                f"{str(err).splitlines()[0]}") from err
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
