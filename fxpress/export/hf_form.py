"""Whether a compressed graph has a Hugging Face form, checked twice: before and after rebuilding the model.

Before: every ``call_function`` node must be an op transformers' own layers
run.  An op of another namespace (``fxpress::merge_tokens``,
``fxpress::binary_linear``, ``fxpress::sparse_linear``...) has no
transformers layer, and a node a pass inserted whose op the captured model
never ran (``abs`` in binarize's scales) is computation the architecture
does not hold.  :func:`refuse_foreign_nodes` names the first such node, the
pass that made it (its provenance, ``fxpress_origin``) and the pass family.

After: :func:`check_outputs` runs the rebuilt model the way the graph was
captured (the source wrapper, with the rebuilt model in place of the
original) on the graph's example inputs and requires the graph's outputs.
That catches what no node shows: a config that recomputes a constant from
a new width (Gemma3's embedding scale sqrt(hidden_size)), a folded or fused
weight the Hugging Face layers do not read.

Both refuse with one-line ArtifactErrors that point to the fxpress forms
every graph has: a compiled artifact or the graph's weights.
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
import torch.fx

from fxpress.errors import ArtifactError
from fxpress.ir.builder import origin
from fxpress.ir.graph import Graph

log = logging.getLogger(__name__)

HF_NAMESPACES = ("aten",)
INSTEAD = ("save fxpress artifacts instead: `fxpress run MODEL --pipeline ... --target llvm --out DIR` "
           "(a compiled model) or fxpress.export.hf.save_weights(graph, PATH) (its weights)")
CAPTURE = "capture"


def _namespace(target: Any) -> str | None:
    """The op namespace of a torch op target (`aten`, `fxpress`, `higher_order`), None for Python callables."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target.namespace
    if isinstance(target, torch._ops.HigherOrderOperator):
        return "higher_order"
    return None


def pass_family(pass_name: str | None) -> str:
    """The folder a registered pass lives in (`binary`, `tokens`, `sparsity`), or `unknown`."""
    from fxpress.passes.infra.registry import registered_passes

    cls = registered_passes().get(pass_name or "")
    parts = cls.__module__.split(".") if cls is not None else []
    return parts[2] if len(parts) > 3 and parts[:2] == ["fxpress", "passes"] else "unknown"


def _maker(node: torch.fx.Node) -> str | None:
    record = origin(node)
    return record.get("pass") if record else None


def foreign_node(graph: Graph) -> tuple[torch.fx.Node, str] | None:
    """The first node without a transformers form and why, or None when every node has one."""
    calls = [n for n in graph.fx.nodes if n.op == "call_function"]
    captured = {n.target for n in calls if _maker(n) == CAPTURE}
    for node in calls:  # custom ops first: they are what the pass is about
        namespace = _namespace(node.target)
        if namespace is not None and namespace not in HF_NAMESPACES and node.target not in captured:
            return node, f"a {namespace} op"
    for node in calls:
        if _maker(node) != CAPTURE and node.target not in captured:
            return node, "an op the captured model never ran"
    return None


def refuse_foreign_nodes(graph: Graph) -> None:
    """ArtifactError naming the first node the Hugging Face architecture cannot run (see the module doc)."""
    found = foreign_node(graph)
    if found is None:
        return
    node, why = found
    maker = _maker(node)
    by = f"made by pass '{maker}' ({pass_family(maker)} passes)" if maker else "of unknown origin"
    text = " ".join(node.format_node().split())
    raise ArtifactError(f"{graph.name} has no Hugging Face form: node `{text}` is {why}, {by}, and no "
                        f"transformers layer computes it; {INSTEAD}")


def _with_model(source: torch.nn.Module, path: str, model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `source` with `model` at attribute path `path` (`source` itself is left alone)."""
    if not path:
        return model
    top = copy.copy(source)
    top._modules = dict(source._modules)
    parent = top
    *owners, leaf = path.split(".")
    for name in owners:
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    parent._modules[leaf] = model
    return top


def _call_pretrained(graph: Graph, model: torch.nn.Module) -> Any:
    """Call a bare PreTrainedModel as capture's wrapper did: inputs by placeholder name, the output it chose."""
    import inspect

    names = [str(n.target) for n in graph.fx.nodes if n.op == "placeholder"]
    if len(names) != len(graph.example_inputs):
        return None
    kwargs = dict(zip(names, graph.example_inputs))
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    chosen = re.search(r"\)\.(\w+)", graph.wrapper or "")
    fields = [chosen.group(1)] if chosen else ["logits", "last_hidden_state"]
    result = model(**kwargs)
    return next((getattr(result, f) for f in fields if isinstance(getattr(result, f, None), torch.Tensor)), None)


def _tensors(value: Any) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(value)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def check_outputs(graph: Graph, source: torch.nn.Module, path: str, model: torch.nn.Module,
                  cause: str = "", rtol: float = 1e-4) -> float:
    """Largest difference between the rebuilt model (called as the graph was captured) and the graph.

    ArtifactError when it exceeds `rtol` times the outputs' scale (at least 1); `cause`, a likely
    reason found by the caller, goes into its message.  A bare
    PreTrainedModel as `source` is called with the graph's input names; when that does not give a
    tensor the check is skipped (logged) and 0.0 returned.
    """
    with torch.no_grad():
        try:
            if path:
                got = _with_model(source, path, model)(*graph.example_inputs)
            else:
                got = _call_pretrained(graph, model)
        except Exception as err:  # noqa: BLE001 - any failure means the folder would not run as the graph does
            raise ArtifactError(f"the exported {type(model).__name__} fails on {graph.name}'s example inputs "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                f"{INSTEAD}") from err
        want = graph(*graph.example_inputs)
    got_list, want_list = _tensors(got), _tensors(want)
    if not got_list:
        log.info("export of %s: cannot call %s as capture did; outputs not compared", graph.name,
                 type(model).__name__)
        return 0.0
    if [t.shape for t in got_list] != [t.shape for t in want_list]:
        raise ArtifactError(f"the exported {type(model).__name__} returns shapes "
                            f"{[list(t.shape) for t in got_list]}, {graph.name} "
                            f"{[list(t.shape) for t in want_list]}; {INSTEAD}")
    error = max(float((g.float() - w.float()).abs().max()) if g.numel() else 0.0
                for g, w in zip(got_list, want_list))
    scale = max([1.0] + [float(w.float().abs().max()) for w in want_list if w.numel()])
    if not error <= rtol * scale:
        raise ArtifactError(f"the exported {type(model).__name__} differs from {graph.name} by {error:.3g} "
                            f"(outputs up to {scale:.3g}) on its example inputs: the graph holds a change its "
                            f"Hugging Face config cannot express{f' ({cause})' if cause else ''}; {INSTEAD}")
    return error
