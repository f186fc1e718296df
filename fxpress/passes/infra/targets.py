"""Lowering targets as passes see them, and the early check that a pipeline fits a target.

A pass declares the ops it may insert (``Pass.creates``); a target says
which ops it can lower (``can_lower(op)``).  :func:`check_target` compares
the two before any work is done, so a pipeline that inserts an op the
chosen target cannot compile fails at once, not after capture and passes:

    check_target(parse_pipeline("merge-tokens{r=8}"), "onnx")
    PipelineError: pass 'merge-tokens' inserts fxpress.merge_tokens, which target 'onnx' cannot lower;
    targets that can: llvm, aarch64, c, cuda

This module is in the passes layer, so it knows no backend: the backends
layer registers its targets here explicitly
(``fxpress.backends.registry.register_lowering_targets``, called once by
``fxpress.backends``).  An op is an OpOverload (or packet) or its qualified
name as text (``"fxpress::merge_tokens"``); both name the same op.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol, runtime_checkable

from fxpress.errors import PipelineError
from fxpress.ir.opinfo import op_label, op_qualname


@runtime_checkable
class LoweringTarget(Protocol):
    """A compilation target: its name, and whether it can lower an op."""

    name: str

    def can_lower(self, op: Any) -> bool: ...


_TARGETS: dict[str, LoweringTarget] = {}


def register_lowering_target(target: LoweringTarget) -> LoweringTarget:
    """Add `target` under its name (registering a name again replaces it, keeping its place)."""
    if not isinstance(target, LoweringTarget) or not isinstance(target.name, str) or not target.name:
        raise PipelineError(f"a lowering target needs a `name` and `can_lower(op)`, got {target!r}")
    _TARGETS[target.name] = target
    return target


def unregister_lowering_target(name: str) -> None:
    _TARGETS.pop(name, None)


def lowering_targets() -> dict[str, LoweringTarget]:
    """Every registered target by name, in registration order."""
    return dict(_TARGETS)


def get_lowering_target(name: str) -> LoweringTarget:
    target = _TARGETS.get(name)
    if target is None:
        known = ", ".join(_TARGETS) or "none (import fxpress.backends to register them)"
        raise PipelineError(f"unknown target {name!r}; known targets: {known}")
    return target


def targets_that_lower(op: Any) -> list[str]:
    """Names of the registered targets that can lower `op`, in registration order."""
    return [name for name, target in _TARGETS.items() if target.can_lower(op)]


def _pass_name(item: Any) -> str:
    return str(getattr(item, "name", None) or type(item).__name__)


def _created_ops(item: Any) -> tuple:
    """The ops a pass (instance or class) declares in ``creates``."""
    cls = item if isinstance(item, type) else type(item)
    return tuple(getattr(item, "creates", getattr(cls, "creates", ())))


def check_target(passes: Iterable[Any], target: str | LoweringTarget) -> None:
    """Raise PipelineError for the first op a pass may insert that `target` cannot lower.

    `passes`: Pass instances or classes (anything with ``name`` and ``creates``).
    `target`: a registered target's name, or a LoweringTarget.
    """
    lowering = get_lowering_target(target) if isinstance(target, str) else target
    for item in passes:
        for op in _created_ops(item):
            if lowering.can_lower(op):
                continue
            able = targets_that_lower(op)
            remedy = f"targets that can: {', '.join(able)}" if able else "no registered target can"
            raise PipelineError(f"pass '{_pass_name(item)}' inserts {op_label(op)}, which target "
                                f"'{lowering.name}' cannot lower; {remedy}")


__all__ = ["LoweringTarget", "check_target", "get_lowering_target", "lowering_targets", "op_label",
           "op_qualname", "register_lowering_target", "targets_that_lower", "unregister_lowering_target"]
