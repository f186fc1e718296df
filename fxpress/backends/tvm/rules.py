"""The lowering-rule table: how ops that TVM's importer does not know become Relax.

Passes insert custom ops (``fxpress::merge_tokens``, ``fxpress::binary_conv2d``);
each needs a rule here.  A rule is ``rule(ctx, node) -> relax.Expr``: ``ctx``
is a :class:`RuleContext` that gives the node's arguments as Relax values and
the block builder to emit into.  The table is keyed by the op's qualified name
(``namespace::name``, optionally ``namespace::name.overload``).

Every ``call_function`` node of the exported program is checked before import:
it must be an op TVM's importer converts or one with a rule here, otherwise
:func:`check_lowerable` raises a LoweringError naming the op and the node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx

from fxpress.errors import LoweringError

LoweringRule = Callable[["RuleContext", torch.fx.Node], Any]
OPAQUE = 8  # Relax's OpPatternKind.kOpaque: FuseOps fuses nothing into or through such a function

_RULES: dict[str, LoweringRule] = {}


def op_name(target: Any) -> str:
    """``namespace::name.overload`` for an OpOverload, ``namespace::name`` for a packet."""
    schema_name = getattr(getattr(target, "_schema", None), "name", None)
    if schema_name is None:
        return getattr(target, "__name__", str(target))
    overload = getattr(target, "_overloadname", "")
    return f"{schema_name}.{overload}" if overload else schema_name


def register_lowering(op: Any, rule: LoweringRule | None = None):
    """Register `rule` for `op` (an OpOverload, packet or ``"ns::name"``); usable as a decorator.

    Registering again replaces the old rule (tests and plug-ins may override).
    """
    key = op if isinstance(op, str) else op_name(op)

    def add(fn: LoweringRule) -> LoweringRule:
        _RULES[key] = fn
        return fn

    return add(rule) if rule is not None else add


def unregister_lowering(op: Any) -> None:
    _RULES.pop(op if isinstance(op, str) else op_name(op), None)


def registered_lowerings() -> dict[str, LoweringRule]:
    return dict(_RULES)


def rule_for(target: Any) -> LoweringRule | None:
    """The rule for an op, by overload name first, then by packet name."""
    name = op_name(target)
    return _RULES.get(name) or _RULES.get(name.partition(".")[0])


def relax_shape(value: Any) -> list[Any]:
    """The dims of a Relax tensor value (IntImm or symbolic PrimExpr each)."""
    return list(value.ty.shape.values)


def rows_as_one_var(bb, x, shape: list, name: str):
    """`x` reshaped to `shape`, whose first dim is a product of symbolic dims, that product named as
    one TIR variable `name` (a match_cast) so that a PrimFunc taking the result can bind it.

    The reshape is TVM's TE gather, whose modulo indexing keeps it opaque: fused into a producer,
    FuseTIR could not map the match_cast's buffer (fxpress legalizes other reshapes to products as
    injective gathers, which fuse: :func:`.pipeline._reshape_affine`)."""
    from tvm import relax, tirx, topi

    flat = bb.emit_te(topi.reshape, x, shape, primfunc_name_hint="reshape")
    return bb.match_cast(flat, relax.TensorType([tirx.Var(name, "int64"), *relax_shape(flat)[1:]], x.ty.dtype))


def static_int(node: torch.fx.Node, value: Any, what: str, fix: str) -> int:
    """`value` (an int or IntImm) as an int; a LoweringError naming the op, node and `fix` if symbolic."""
    if isinstance(value, int):
        return value
    if hasattr(value, "value"):  # an IntImm has a value, a symbolic Var has not
        return int(value.value)
    raise LoweringError(f"{op_name(node.target)} at node {node.format_node()} has a symbolic {what} ({value}); "
                        f"the TVM rule needs it static: {fix}")


@dataclass
class RuleContext:
    """What a rule sees: the importer (its block builder and value environment)."""

    importer: Any

    @property
    def bb(self):
        """The Relax BlockBuilder to emit into."""
        return self.importer.block_builder

    def args(self, node: torch.fx.Node) -> list[Any]:
        """The node's positional arguments, fx Nodes replaced by their Relax values."""
        return list(self.importer.retrieve_args(node))

    def emit_te(self, compute: Callable, *args: Any, name: str = "fxpress_op") -> Any:
        """Emit a TE compute (which may use TIR intrinsics such as popcount) as a call_tir."""
        return self.bb.emit_te(compute, *args, primfunc_name_hint=name)

    def emit_scheduled(self, compute: Callable, inputs: dict[str, Any], schedule: Callable, name: str) -> Any:
        """call_tir of ``compute(**placeholders)`` (None inputs stay None) built as a PrimFunc, scheduled
        by ``schedule(func) -> func`` and marked scheduled and opaque: no rule reschedules it and fusion
        leaves it whole."""
        from tvm import relax, te

        holders = {key: te.placeholder(relax_shape(value), str(value.ty.dtype), key) if value is not None else None
                   for key, value in inputs.items()}
        out = compute(**holders)
        func = te.create_prim_func([h for h in holders.values() if h is not None] + [out], "int64")
        func = schedule(func).without_attr("global_symbol")
        gv = self.bb.add_func(func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE), name)
        args = [value for value in inputs.values() if value is not None]
        return self.bb.emit(relax.call_tir(gv, args, relax.TensorType(list(out.shape), out.dtype)))


def custom_convert_map(nodes: list[torch.fx.Node]) -> dict[str, Callable]:
    """TVM importer entries (keyed by ``target.__name__``) for the nodes that have rules."""
    entries: dict[str, Callable] = {}
    for node in nodes:
        if node.op != "call_function":
            continue
        rule = rule_for(node.target)
        if rule is not None:
            entries[node.target.__name__] = _adapt(rule)
    return entries


def _adapt(rule: LoweringRule) -> Callable:
    def convert(node: torch.fx.Node, importer: Any) -> Any:
        try:
            return rule(RuleContext(importer), node)
        except LoweringError:
            raise
        except Exception as err:  # noqa: BLE001 - a rule failing is a lowering failure
            raise LoweringError(f"lowering rule for {op_name(node.target)} failed on node "
                                f"{node.format_node()}: {type(err).__name__}: {err}") from err
    return convert


def check_lowerable(nodes: list[torch.fx.Node], known: set[str]) -> None:
    """Raise LoweringError for the first op neither TVM's importer (`known`) nor a rule covers."""
    for node in nodes:
        if node.op != "call_function":
            continue
        if rule_for(node.target) is not None:
            continue
        namespace = op_name(node.target).partition("::")[0]
        builtin = namespace in ("aten", "prims") or "::" not in op_name(node.target)
        if builtin and node.target.__name__ in known:
            continue
        raise LoweringError(
            f"no TVM lowering rule for op {op_name(node.target)} at node {node.format_node()}; "
            f"register one with fxpress.backends.register_lowering({op_name(node.target)!r}, rule) "
            f"or compile with target='onnx' if ONNX supports it")
