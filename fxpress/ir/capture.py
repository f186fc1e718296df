"""Capture an nn.Module into the IR.

`torch.export.export(..., strict=False)` is the default: it captures
Hugging Face BERT, LLaMA and ViT exactly and records the owning module of
every node (`nn_module_stack`).  `method="symbolic_trace"` uses
torch.fx.symbolic_trace for simple modules whose users want module-level
nodes.  The user's model is never changed: its mode, parameters and
buffers are as they were.
"""
from __future__ import annotations

import contextlib
import io
import logging
import traceback
from typing import Any, Mapping

import torch
import torch.fx

from fxpress.errors import CaptureError
from fxpress.ir.builder import mark_captured
from fxpress.ir.graph import Graph

log = logging.getLogger(__name__)

DynamicSpec = bool | Mapping[int, Mapping[int, str]] | None


def capture(model: torch.nn.Module, example_inputs: Any, *, dynamic: DynamicSpec = False,
            method: str = "export", name: str | None = None) -> Graph:
    """Capture `model` called on `example_inputs` into an annotated `Graph`.

    dynamic: False (all shapes static), True (dim 0 of every tensor input is a
    dynamic batch), or {input index: {dim: name}} for chosen dims, e.g.
    `{0: {0: "batch", 1: "seq"}}`.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    name = name or type(model).__name__
    if method == "export":
        module, shapes = _export(model, inputs, dynamic, name)
    elif method == "symbolic_trace":
        if dynamic:
            raise CaptureError("symbolic_trace graphs carry no shapes to make dynamic; "
                               "use method='export' for dynamic dims")
        module, shapes = _symbolic_trace(model, name), None
    else:
        raise CaptureError(f"unknown capture method {method!r}; use 'export' or 'symbolic_trace'")
    mark_captured(module.graph)
    graph = Graph(module, inputs, name=name, source=method, dynamic_shapes=shapes)
    try:
        graph.annotate()
    except Exception as err:  # noqa: BLE001 - any failure here is a capture failure
        raise CaptureError(f"captured {name} but could not run the graph on the example inputs: "
                           f"{_first_line(err)}") from err
    log.info("captured %s: %d nodes, %d params", name, graph.num_nodes, graph.num_params)
    return graph


def dynamic_shapes_for(inputs: tuple, dynamic: DynamicSpec) -> tuple | None:
    """torch.export dynamic_shapes for `inputs` from a DynamicSpec."""
    if not dynamic:
        return None
    if dynamic is True:
        dynamic = {i: {0: "batch"} for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)}
    spec = []
    for index, value in enumerate(inputs):
        wanted = dynamic.get(index)
        if not wanted or not isinstance(value, torch.Tensor):
            spec.append(None)
            continue
        for dim in wanted:
            if dim >= value.dim():
                raise CaptureError(f"dynamic dim {dim} of input {index} does not exist: "
                                   f"the input has shape {tuple(value.shape)}")
        # Dim.DYNAMIC lets export refine ranges (e.g. seq <= 512) and fails only if a dim
        # turns out fixed; the labels are kept in the Graph for readers.
        spec.append({dim: torch.export.Dim.DYNAMIC for dim in wanted})
    return tuple(spec)


def _export(model: torch.nn.Module, inputs: tuple, dynamic: DynamicSpec, name: str):
    shapes = dynamic_shapes_for(inputs, dynamic)
    chatter = io.StringIO()  # export writes partial graphs to stderr on some failures
    try:
        with contextlib.redirect_stderr(chatter):
            program = torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # noqa: BLE001 - torch.export raises many kinds
        raise CaptureError(_explain(name, err, dynamic=bool(dynamic))) from err
    finally:
        if chatter.getvalue().strip():
            log.debug("torch.export wrote to stderr:\n%s", chatter.getvalue())
    module = program.module()
    _drop_guards(module)
    return module, shapes


def _drop_guards(module: torch.fx.GraphModule) -> None:
    """Remove the input-guard call torch.export inserts; the IR checks inputs itself."""
    for node in list(module.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            module.graph.erase_node(node)
            delattr(module, str(node.target))
    module.recompile()


def _symbolic_trace(model: torch.nn.Module, name: str) -> torch.fx.GraphModule:
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001
        raise CaptureError(_explain(name, err, dynamic=False, traced=True)) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def _user_frame(err: BaseException) -> str | None:
    """file:line and code of the innermost frame outside torch, or None."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and "/fxpress/" not in f.filename]
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"


def _explain(name: str, err: BaseException, *, dynamic: bool, traced: bool = False) -> str:
    where = _user_frame(err)
    text = str(err)
    if traced:
        hint = "torch.fx.symbolic_trace cannot follow this model; capture with method='export'"
    elif "data-dependent" in text or "GuardOnDataDependent" in type(err).__name__:
        hint = ("the model branches on tensor values; make the branch shape-based, use torch.cond, "
                "or capture a sub-module that avoids it")
    elif dynamic and ("Constraint" in text or "specializ" in text):
        hint = "the model fixes a dim you asked to be dynamic; capture with dynamic=False"
    else:
        hint = "check that the model runs eagerly on these example inputs, then report the op above"
    at = f" at {where}" if where else ""
    return f"cannot capture {name}: {type(err).__name__}: {_first_line(err)}{at}. Try: {hint}"
