"""Call a Hugging Face model the way graph capture needs: named tensors in, one tensor out, no cache.

A transformers ``PreTrainedModel`` returns a ``ModelOutput`` (logits, hidden
states, a ``DynamicCache`` ...), which ``torch.export`` cannot flatten.
:func:`wrap_pretrained` puts it in a :class:`PretrainedOutput` that

- passes the example inputs by name (``input_ids``, ``attention_mask``,
  ``pixel_values`` ...; a dict or tokenizer ``BatchEncoding`` names them
  itself, a tuple follows the order of the model's ``forward``),
- turns the KV cache off (``use_cache=False``) where ``forward`` takes it,
- returns one tensor of the output: ``logits`` when the model has them
  (causal LMs, classifiers), else ``last_hidden_state`` (encoders); any
  other field by name (``pooler_output``), or ``mean_pooled`` (the
  attention-masked mean of ``last_hidden_state``, a sentence embedding).

The wrapped model is the wrapper's ``model`` attribute, so module paths
read as in the zoo: ``model.model.layers.3.self_attn.q_proj``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from fxpress.errors import CaptureError, first_line

MEAN_POOLED = "mean_pooled"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
DEFAULT_OUTPUTS = ("logits", "last_hidden_state")


def is_pretrained(module: Any) -> bool:
    """True for a transformers ``PreTrainedModel`` (checked by class name: transformers need not be imported)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__)


class PretrainedOutput(nn.Module):
    """``model(**named inputs, use_cache=False).<output>`` as one tensor; see the module docstring."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...], output: str):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.output = output
        self.no_cache = "use_cache" in inspect.signature(model.forward).parameters
        self.training = model.training  # the wrapper itself, not .train(): that would change the user's model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(zip(self.input_names, inputs))
        if self.no_cache:
            kwargs["use_cache"] = False
        result = self.model(**kwargs)
        if self.output == MEAN_POOLED:
            return mean_pooled(result.last_hidden_state, kwargs.get("attention_mask"))
        return getattr(result, self.output)

    def describe(self) -> str:
        """``LlamaForCausalLM(input_ids, use_cache=False).logits``"""
        call = ", ".join(self.input_names + (("use_cache=False",) if self.no_cache else ()))
        return f"{type(self.model).__name__}({call}).{self.output}"


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (B, S, H) over the tokens ``attention_mask`` keeps: (B, H)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


@dataclass(frozen=True)
class Wrapped:
    """What :func:`wrap_pretrained` made: the module to capture, its positional inputs, the dims that
    may vary (input index -> {dim: label}) and a one-line description."""

    module: PretrainedOutput
    inputs: tuple[torch.Tensor, ...]
    dynamic_dims: dict[int, dict[int, str]]
    description: str


def wrap_pretrained(model: nn.Module, example_inputs: Any, output: str | None = None) -> Wrapped:
    """Wrap a transformers model for capture; runs it once on the inputs to choose and check the output."""
    names, inputs = _named_inputs(model, example_inputs)
    wrapper = _named_wrapper(model, names, output or "logits")
    wrapper.output = _choose_output(wrapper, inputs, output)
    dims = {i: ({0: "batch", 1: "seq"} if name in TOKEN_INPUTS and x.dim() >= 2 else {0: "batch"})
            for i, (name, x) in enumerate(zip(names, inputs))}
    return Wrapped(wrapper, inputs, dims, wrapper.describe())


def _named_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    model_name = type(model).__name__
    accepted = [name for name, p in inspect.signature(model.forward).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if isinstance(example_inputs, Mapping):
        pairs = [(str(k), v) for k, v in example_inputs.items() if v is not None]
    else:
        values = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if len(values) > len(accepted):
            raise CaptureError(f"{model_name}.forward takes {len(accepted)} named inputs, got {len(values)} "
                               f"example inputs")
        pairs = list(zip(accepted, values))
    for name, value in pairs:
        if name not in accepted:
            raise CaptureError(f"{model_name}.forward has no input '{name}'; it takes {', '.join(accepted[:8])}")
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"example input '{name}' of {model_name} is a {type(value).__name__}; pass tensors "
                               f"(e.g. tokenizer(..., return_tensors='pt'))")
    if not pairs:
        raise CaptureError(f"no example inputs for {model_name}: pass e.g. (input_ids,) or a tokenizer's output")
    return tuple(n for n, _ in pairs), tuple(v for _, v in pairs)


def _named_wrapper(model: nn.Module, names: tuple[str, ...], output: str) -> PretrainedOutput:
    """A PretrainedOutput whose forward's signature names the inputs, so graph placeholders carry the names."""
    return with_input_names(PretrainedOutput, names)(model, names, output)


def with_input_names(cls: type[nn.Module], names: tuple[str, ...]) -> type[nn.Module]:
    """A subclass of `cls` (whose forward takes `*inputs`) with a forward signature naming each input:
    torch.export names graph placeholders after it."""
    def forward(self, *inputs):
        return cls.forward(self, *inputs)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature([inspect.Parameter("self", kind)] +
                                              [inspect.Parameter(n, kind) for n in names])
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


def _choose_output(wrapper: PretrainedOutput, inputs: tuple, wanted: str | None) -> str:
    model_name = type(wrapper.model).__name__
    kwargs = dict(zip(wrapper.input_names, inputs)) | ({"use_cache": False} if wrapper.no_cache else {})
    try:
        with torch.no_grad():
            result = wrapper.model(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's model may raise anything
        raise CaptureError(f"{model_name} does not run on the example inputs ({', '.join(wrapper.input_names)}): "
                           f"{type(err).__name__}: {first_line(err)}") from err
    fields = [k for k, v in result.items() if isinstance(v, torch.Tensor)] if hasattr(result, "items") else []
    if wanted == MEAN_POOLED and "last_hidden_state" in fields:
        return wanted
    if wanted is not None:
        if wanted in fields:
            return wanted
        raise CaptureError(f"{model_name}'s output has no tensor '{wanted}'; choose output= one of "
                           f"{', '.join(fields + ([MEAN_POOLED] if 'last_hidden_state' in fields else []))}")
    for name in DEFAULT_OUTPUTS:
        if name in fields:
            return name
    raise CaptureError(f"{model_name} returns {type(result).__name__} without logits or last_hidden_state; "
                       f"choose the tensor with output= one of {', '.join(fields) or '(none: no tensors)'}")
