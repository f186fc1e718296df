"""Op facts: what the IR needs to know about an op, looked up by the node's target.

An `OpInfo` records, for one op (an ATen overload, an `fxpress::` custom op,
or a Python callable from symbolic_trace):

- `category`: what kind of work it does (`matmul`, `conv`, `elementwise`,
  `view`, `norm`, `softmax`, `attention`, `reduction`, `shape`, `tokens`,
  `binary`, ...); passes ask `ops_in(category)` instead of keeping private sets;
- `macs(node, arg_shapes, out_shape)`: multiply-accumulates of one call; the
  rule sees the node, so an op whose cost depends on an option (merge_tokens'
  `mode`) is counted right;
- `flow`: how a tracked dimension moves from the inputs to the output
  (see `fxpress.analysis.token_flow`); None means "not followed";
- `coupling`: which slices of the op's inputs and output must be removed
  together (see `fxpress.analysis.dimension_flow`); None means "no rule".

The registry is the mechanism; the facts themselves are defined once, beside
each op, in `fxpress.ops` (the dialect).  The IR sits below the dialect and
never imports it: it knows the dialect packages by name (`DIALECTS`) and
loads them on the first lookup, as a plugin registry does, so a graph is
never annotated before every op and its facts exist, and `import fxpress`
stays cheap.  `define_op` refuses a second, different definition.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fxpress.errors import FxpressError

Shape = Sequence[int]
MacRule = Callable[[Any, list, Shape], int]  # (node, argument shapes, output shape) -> MACs


@dataclass(frozen=True)
class OpInfo:
    """The facts of one op (see the module doc)."""

    target: object
    category: str = "other"
    macs: MacRule | None = None
    flow: Callable | None = None
    doc: str = ""
    coupling: Callable | None = None

    @property
    def name(self) -> str:
        return op_name(self.target)


_REGISTRY: dict[object, OpInfo] = {}
DIALECTS = ("fxpress.ops",)  # packages whose import defines ops (named, not imported: they sit above the IR)
_LOADED: list[str] = []


def load_dialects() -> None:
    """Import the dialect packages once (each defines its ops with `define_op` when imported)."""
    for package in DIALECTS:
        if package not in _LOADED:
            _LOADED.append(package)  # first, so a lookup during the import does not import again
            importlib.import_module(package)


def op_name(target: object) -> str:
    """A readable op name: `aten.linear.default`, `fxpress.merge_tokens.default`, `operator.getitem`."""
    if hasattr(target, "_schema") or type(target).__name__ == "OpOverload":
        return str(target)
    module = getattr(target, "__module__", "") or ""
    return f"{module.rpartition('.')[2] or module}.{getattr(target, '__name__', target)}" if module else str(target)


def op_qualname(op: Any) -> str:
    """``namespace::name`` of an OpOverload, packet or qualified-name string (overload dropped)."""
    if isinstance(op, str):
        return op.partition(".")[0] if "::" in op else op
    schema_name = getattr(getattr(op, "_schema", None), "name", None)
    if schema_name is not None:
        return schema_name
    qualified = getattr(op, "_qualified_op_name", None)  # an OpOverloadPacket
    return qualified if isinstance(qualified, str) else getattr(op, "__name__", str(op))


def op_label(op: Any) -> str:
    """How messages name an op: ``fxpress.merge_tokens``."""
    return op_qualname(op).replace("::", ".")


def define_op(info: OpInfo) -> OpInfo:
    """Record the facts of `info.target`; a different second definition is an error."""
    known = _REGISTRY.get(info.target)
    if known is not None and known != info:
        raise FxpressError(f"op {info.name} is already defined (category {known.category}); define each op "
                           "once, in fxpress/ops/")
    _REGISTRY[info.target] = info
    return info


def define_ops(targets: Sequence[object], **facts: Any) -> None:
    """The same facts for several ops (say every elementwise op with one flow rule)."""
    for target in targets:
        define_op(OpInfo(target, **facts))


def op_info(target: object) -> OpInfo | None:
    """The facts of an op, or None for an op fxpress has no facts about."""
    load_dialects()
    try:
        return _REGISTRY.get(target)
    except TypeError:  # unhashable targets (never for real FX nodes)
        return None


def ops_in(*categories: str) -> tuple[object, ...]:
    """Every defined op of the given categories."""
    load_dialects()
    return tuple(t for t, info in _REGISTRY.items() if info.category in categories)


def node_macs(node: Any, arg_shapes: list, out_shape: Shape | None) -> int:
    """MACs of one call: the op's rule, or 0 for ops without one (elementwise, views, reductions)."""
    info = op_info(node.target)
    if info is None or info.macs is None or out_shape is None:
        return 0
    return int(info.macs(node, arg_shapes, out_shape))


def registered_ops() -> dict[str, OpInfo]:
    """Every op with facts, by name (for `fxpress ops` and tests)."""
    load_dialects()
    return {info.name: info for info in _REGISTRY.values()}
