"""Capture an nn.Module into the IR.

`torch.export.export(..., strict=False)` is the default: it captures
Hugging Face BERT, LLaMA and ViT exactly and records the owning module of
every node (`nn_module_stack`).  `method="symbolic_trace"` uses
torch.fx.symbolic_trace for simple modules whose users want module-level
nodes.  The user's model is never changed: its mode, parameters and
buffers are as they were.

Hugging Face models (``PreTrainedModel``) are wrapped first
(:mod:`fxpress.zoo.hf_wrap`): inputs by name, cache off, one output tensor
(``output=`` picks it), batch and sequence dims dynamic by default where
the model allows.  Dynamic dims whose example size is 1 are captured from a
size-2 copy, since torch.export fixes size-1 dims.  The graph's ``wrapper``
says how the model was called.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import sysconfig
import traceback
import warnings
from typing import Any, Mapping

import torch
import torch.fx

from fxpress.errors import CaptureError, first_line
from fxpress.ir.builder import mark_captured
from fxpress.ir.graph import Graph
from fxpress.zoo.hf_wrap import PretrainedOutput, is_pretrained, with_input_names, wrap_pretrained

log = logging.getLogger(__name__)

DynamicSpec = bool | Mapping[int, Mapping[int, str]] | None


def capture(model: torch.nn.Module, example_inputs: Any, *, dynamic: DynamicSpec = None,
            method: str = "export", name: str | None = None, output: str | None = None,
            example_kwargs: Mapping[str, Any] | None = None) -> Graph:
    """Capture `model` called on `example_inputs` into an annotated `Graph`.

    dynamic: None (default: static, except a Hugging Face model's batch and sequence dims), False (all
    shapes static), True (dim 0 of every tensor input is a dynamic batch), or {input index: {dim: name}}
    for chosen dims, e.g. `{0: {0: "batch", 1: "seq"}}`.
    output: which tensor of a Hugging Face model's output to capture ("logits", "last_hidden_state",
    "pooler_output", "mean_pooled", ...); the default is logits, else last_hidden_state.
    example_kwargs: keyword arguments of forward; the graph takes them by position after
    `example_inputs`, in this order (its placeholders carry their names).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    name = name or type(model).__name__
    if example_kwargs:
        model, example_inputs = _keywords_by_position(model, example_inputs, example_kwargs, name)
    model, inputs, auto_dims, wrapper = _prepare(model, example_inputs, output, name)
    _warn_if_training(model, name)
    if method == "export":
        module, shapes, inputs, dims = _export_dynamic(model, inputs, dynamic, auto_dims, name)
    elif method == "symbolic_trace":
        if dynamic:
            raise CaptureError("symbolic_trace graphs carry no shapes to make dynamic; "
                               "use method='export' for dynamic dims")
        module, shapes, dims = _symbolic_trace(model, name), None, None
    else:
        raise CaptureError(f"unknown capture method {method!r}; use 'export' or 'symbolic_trace'")
    mark_captured(module.graph)
    graph = Graph(module, inputs, name=name, source=method, dynamic_shapes=shapes)
    if wrapper:
        graph.wrapper = f"{wrapper}; dynamic: {_describe_dims(dims, inputs) or 'none'}"
    try:
        graph.annotate()
    except Exception as err:  # noqa: BLE001 - any failure here is a capture failure
        raise CaptureError(f"captured {name} but could not run the graph on the example inputs: "
                           f"{first_line(err) or type(err).__name__}") from err
    log.info("captured %s: %d nodes, %d params", name, graph.num_nodes, graph.num_params)
    return graph


def _prepare(model: torch.nn.Module, example_inputs: Any, output: str | None, name: str):
    """(module to export, its positional inputs, automatic dynamic dims or None, how it was wrapped or None)."""
    if is_pretrained(model):
        wrapped = wrap_pretrained(model, example_inputs, output)
        return wrapped.module, wrapped.inputs, wrapped.dynamic_dims, wrapped.description
    if output is not None and not (isinstance(model, PretrainedOutput) and model.output == output):
        kind = f"already returns .{model.output}" if isinstance(model, PretrainedOutput) else "is not one"
        raise CaptureError(f"output={output!r} selects a Hugging Face model's output, and {name} {kind}; "
                           "capture the Hugging Face model itself, or return the tensor you want from forward")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    _check_positional(model, inputs, name)
    return model, inputs, None, model.describe() if isinstance(model, PretrainedOutput) else None


class KeywordsByPosition(torch.nn.Module):
    """``model(*inputs[:n], **dict(zip(keywords, inputs[n:])))``: a forward with keyword arguments, called
    with every input by position (what a graph takes)."""

    def __init__(self, model: torch.nn.Module, positional: int, keywords: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.positional = positional
        self.keywords = keywords
        self.training = model.training  # not .train(): that would change the user's model

    def forward(self, *inputs: Any) -> Any:
        return self.model(*inputs[:self.positional], **dict(zip(self.keywords, inputs[self.positional:])))


def _keywords_by_position(model: torch.nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any],
                          name: str) -> tuple[torch.nn.Module, tuple]:
    if is_pretrained(model):
        return model, {**_hf_named(model, example_inputs), **example_kwargs}
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        inspect.signature(model.forward).bind(*inputs, **example_kwargs)
    except TypeError as err:
        raise CaptureError(f"cannot capture {name}: forward{inspect.signature(model.forward)} does not take these "
                           f"example inputs and keyword arguments ({err})") from err
    keywords = tuple(example_kwargs)
    names = tuple(f"arg{i}" for i in range(len(inputs))) + keywords
    adapter = with_input_names(KeywordsByPosition, names)(model, len(inputs), keywords)
    return adapter, inputs + tuple(example_kwargs.values())


def _hf_named(model: torch.nn.Module, example_inputs: Any) -> dict[str, Any]:
    """A Hugging Face model's positional example inputs by the names of its forward's parameters."""
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    values = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return dict(zip(inspect.signature(model.forward).parameters, values))


def _check_positional(model: torch.nn.Module, inputs: tuple, name: str) -> None:
    """CaptureError when forward cannot take the example inputs by position (it needs keyword arguments)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*inputs)
    except TypeError as err:
        raise CaptureError(f"cannot capture {name}: its forward{signature} cannot be called with the "
                           f"{len(inputs)} example inputs by position ({err}); pass the others as "
                           "example_kwargs=, or wrap the model in a module whose forward takes every input positionally"
                           ) from err


def _warn_if_training(model: torch.nn.Module, name: str) -> None:
    """Warn when dropout or batch norm modules are in training mode: capture would record training behaviour."""
    training = [path for path, m in model.named_modules()
                if m.training and (isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                   or (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0))]
    if training:
        message = (f"capturing {name} in training mode: {len(training)} dropout/batch-norm modules (e.g. "
                   f"{training[0]}) would be captured with their training behaviour (random masks, batch "
                   "statistics); call model.eval() before capture")
        log.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _export_dynamic(model: torch.nn.Module, inputs: tuple, dynamic: DynamicSpec,
                    auto_dims: dict | None, name: str):
    """Export with the dims asked for; with dynamic=None, the automatic dims, fewer if the model fixes some.

    Returns (module, dynamic_shapes, the inputs the graph keeps, the dims made dynamic).
    """
    if dynamic is not None or not auto_dims:
        dims = _dims_of(inputs, dynamic or False)
        widened = _widen_unit_dims(inputs, dims)
        module, shapes = _export(model, widened, dims, name)
        return module, shapes, widened, dims
    attempts = [auto_dims, {i: {0: "batch"} for i in auto_dims}]
    for dims in attempts:
        widened = _widen_unit_dims(inputs, dims)
        try:
            module, shapes = _export(model, widened, dims, name)
            return module, shapes, widened, dims
        except CaptureError as err:
            log.info("%s: dynamic %s did not capture (%s); trying fewer dynamic dims",
                     name, _describe_dims(dims, inputs), err)
    module, shapes = _export(model, inputs, False, name)
    return module, shapes, inputs, {}


def _dims_of(inputs: tuple, dynamic: DynamicSpec) -> dict[int, dict[int, str]]:
    """The DynamicSpec as {input index: {dim: label}} ({} for static)."""
    if not dynamic:
        return {}
    if dynamic is True:
        return {i: {0: "batch"} for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)}
    return {int(i): dict(d) for i, d in dynamic.items()}


def _widen_unit_dims(inputs: tuple, dims: Mapping[int, Mapping[int, str]]) -> tuple:
    """The inputs with every dynamic dim of size 1 repeated to size 2 (torch.export fixes size-1 dims)."""
    widened = list(inputs)
    for index, wanted in dims.items():
        value = widened[index] if index < len(widened) else None
        if not isinstance(value, torch.Tensor):
            continue
        for dim in wanted:
            if dim < value.dim() and value.shape[dim] == 1:
                value = torch.cat([value, value], dim=dim)
        if value is not widened[index]:
            log.info("input %d has size 1 in a dynamic dim: capturing from a size-2 copy", index)
        widened[index] = value
    return tuple(widened)


def _describe_dims(dims: Mapping[int, Mapping[int, str]] | None, inputs: tuple) -> str:
    """`input 0 dims batch, seq`: which dims are dynamic."""
    return "; ".join(f"input {i} dims {', '.join(d.values())}" for i, d in sorted((dims or {}).items()) if d)


def dynamic_shapes_for(inputs: tuple, dynamic: DynamicSpec) -> tuple | None:
    """torch.export dynamic_shapes for `inputs` from a DynamicSpec."""
    dims = _dims_of(inputs, dynamic)
    if not dims:
        return None
    spec = []
    for index, value in enumerate(inputs):
        wanted = dims.get(index)
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
    shapes = dynamic_shapes_for(inputs, dynamic) if dynamic else None
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


def _cause(err: BaseException) -> str:
    """The lines of torch's message that say what went wrong: the first, and the first item of a list
    under it ("- You marked L['x'].size()[0] as dynamic but your code specialized it ..."), one sentence."""
    lines = [line.strip() for line in (str(err).strip() or type(err).__name__).splitlines() if line.strip()]
    text = re.sub(r"\s*For more information.*$", "", lines[0])
    item = next((line for line in lines[1:] if line.startswith("- ")), None)
    if item:
        first_sentence = re.split(r"(?<=[.)])\s", item[2:], maxsplit=1)[0]
        text = f"{text.rstrip('.:!')}: {first_sentence.rstrip('.')}"
    return text if len(text) <= 600 else text[:597] + "..."


def _user_frame(err: BaseException) -> str | None:
    """file:line and code of the innermost frame in a real file outside torch and fxpress, or None."""
    stdlib = sysconfig.get_paths()["stdlib"]
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and "/fxpress/" not in f.filename and not f.filename.startswith("<")
              and not f.filename.startswith(stdlib)]
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"


def _unflattenable_output(text: str) -> str | None:
    """The class named by torch's "Found <class X> in output, which is not a known type", or None."""
    match = re.search(r"Found <class '([^']+)'> in output", text)
    return match.group(1) if match else None


def _explain(name: str, err: BaseException, *, dynamic: bool, traced: bool = False) -> str:
    text = str(err)
    unflattenable = _unflattenable_output(text)
    if unflattenable:
        return (f"cannot capture {name}: it returns a {unflattenable}, which is not tensors and which torch.export "
                "cannot flatten. Try: return a tensor (or a tuple or dict of tensors) from forward, e.g. a wrapper "
                "module returning `model(x).logits`; Hugging Face models are wrapped by capture itself "
                "(capture(..., output='logits'))")
    where = _user_frame(err)
    if traced:
        hint = "torch.fx.symbolic_trace cannot follow this model; capture with method='export'"
    elif "data-dependent" in text or "GuardOnDataDependent" in type(err).__name__:
        hint = ("the model branches on tensor values; make the branch shape-based, use torch.cond, "
                "or capture a sub-module that avoids it")
    elif dynamic and ("Constraint" in text or "specializ" in text or "conflicts" in text):
        hint = ("the model fixes a dim you asked to be dynamic (named above); leave that dim static, "
                "or capture with dynamic=False")
    else:
        hint = "check that the model runs eagerly on these example inputs, then report the op above"
    at = f" at {where}" if where else ""
    return f"cannot capture {name}: {type(err).__name__}: {_cause(err)}{at}. Try: {hint}"
