"""constant folding: op(constants) -> get_attr(_folded.<op>), computed once.

A node is constant when every input is a buffer, a literal, or another
constant node: `mul(%buf, 2.0)`, `arange(6)`, the rotary cos/sin tables of
a Hugging Face decoder.  Each constant node whose value some runtime node
reads is evaluated once and replaced by a read of a new buffer
`_folded.<node name>`; the subgraph that computed it goes away, and so do
buffers nothing reads any more.  Asserts on constants
(`_assert_tensor_metadata`) are checked once and dropped.

Not folded: random or impure ops, uninitialised memory (`empty`), buffers
some in-place op writes, and values over `max_growth` times the bytes of
the constants they come from when also over 1 MiB (an `expand` of a buffer
to a batch stays an `expand`).  Parameters count as constants only with
`fold_params=true`: folding one freezes a trainable weight into a buffer.
Outputs are bit-identical: the same ATen ops run on the same tensors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx

from fxpress.ir.builder import Builder
from fxpress.ir.graph import Graph
from fxpress.ir.rewrite import add_tensor, ancestors
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass

log = logging.getLogger(__name__)

aten = torch.ops.aten

FOLDED_MODULE = "_folded"
SMALL_BYTES = 1 << 20  # values up to this size fold whatever their growth

# Asserts about a tensor's metadata: on a constant they are checked once, then dropped.
_CONSTANT_ASSERTS = {aten._assert_tensor_metadata.default}
# In-place ops that only touch autograd metadata, evaluated through a functional twin.
_FUNCTIONAL_TWIN = {aten.detach_.default: aten.detach.default}
# Ops (by base name) whose result is random or uninitialised memory.
_NONDETERMINISTIC = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
    "multinomial", "normal", "poisson", "uniform", "exponential", "geometric", "cauchy", "log_normal",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "native_dropout", "rrelu", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
}


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """op(buffers, literals) -> get_attr(_folded.op): constant subgraphs computed once."""

    name: ClassVar[str] = "fold-constants"
    preserves_semantics: ClassVar[bool] = True

    max_growth: float = 4.0  # skip values over this many times their inputs' bytes (and over 1 MiB)
    fold_params: bool = False  # also fold through nn.Parameters (freezes them into buffers)

    def __post_init__(self) -> None:
        if not self.max_growth > 0:
            raise self.bad_option(f"max_growth must be positive, got {self.max_growth}")

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        plan = plan_folding(graph, self.max_growth, self.fold_params)
        if not plan.folds and not plan.asserts:
            return PassResult(graph, modified=False, stats={
                **_stats(plan, [], 0, []), "reason": "no subgraph computed from constants alone worth folding"})
        new = graph.copy()
        before = new.num_nodes
        paths = _apply(plan, new, self.name)
        removed = new.remove_unused_attributes()
        new.recompile()
        return PassResult(new, modified=True, stats=_stats(plan, paths, before - new.num_nodes, removed))


@dataclass
class FoldPlan:
    """What folding would do, keyed by node name so it applies to a copy of the graph."""

    folds: dict[str, torch.Tensor] = field(default_factory=dict)  # node name -> its value
    asserts: list[str] = field(default_factory=list)  # constant asserts that held
    cone: set[str] = field(default_factory=set)  # constant nodes the folds and asserts read
    skipped_large: list[str] = field(default_factory=list)


def _stats(plan: FoldPlan, paths: list[str], removed_nodes: int, removed_attributes: list[str]) -> dict[str, Any]:
    return {
        "folded_nodes": len(plan.folds),
        "removed_nodes": removed_nodes,
        "new_constants": paths,
        "new_constant_bytes": sum(_nbytes(v) for v in plan.folds.values()),
        "dropped_asserts": len(plan.asserts),
        "removed_attributes": removed_attributes,
        "skipped_large": list(plan.skipped_large),
    }


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# -- which nodes are constant -------------------------------------------------------------
def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", "")


def _is_foldable_op(node: torch.fx.Node) -> bool:
    """Pure and deterministic: the same inputs always give the same value, and nothing else changes."""
    if node.op == "call_method":
        name = str(node.target)
        return not (name.endswith("_") and not name.endswith("__")) and name not in _NONDETERMINISTIC
    if node.op != "call_function" or "out" in node.kwargs:
        return False
    target = node.target
    if target in _FUNCTIONAL_TWIN:
        return True
    if isinstance(target, torch._ops.HigherOrderOperator) or _op_name(node) in _NONDETERMINISTIC:
        return False
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not node.is_impure()


def _writes_inputs(node: torch.fx.Node) -> bool:
    """Whether `node` may write into (or otherwise change) the tensors it reads."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op != "call_function" or node.target in _CONSTANT_ASSERTS or node.target in _FUNCTIONAL_TWIN:
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return any(arg.alias_info is not None and arg.alias_info.is_write
                   for arg in node.target._schema.arguments)
    return node.is_impure() and _op_name(node) not in _NONDETERMINISTIC  # e.g. setitem


def _may_alias(node: torch.fx.Node) -> bool:
    if isinstance(node.target, torch._ops.OpOverload):
        return any(ret.alias_info is not None for ret in node.target._schema.returns)
    return node.op in ("call_function", "call_method")


def _written_attributes(graph: Graph) -> set[str]:
    """get_attr targets some node may write into, directly or through a view.

    A called module may update its own buffers (BatchNorm in training, caches): its
    path is recorded with a trailing dot, and its buffers count as written.
    """
    written: set[str] = {f"{n.target}." for n in graph.fx.nodes if n.op == "call_module"}
    for node in graph.fx.nodes:
        if not _writes_inputs(node):
            continue
        stack, seen = list(node.all_input_nodes), set()
        while stack:
            source = stack.pop()
            if source in seen:
                continue
            seen.add(source)
            if source.op == "get_attr":
                written.add(str(source.target))
            elif _may_alias(source):
                stack.extend(source.all_input_nodes)
    return written


def _is_constant_attribute(graph: Graph, node: torch.fx.Node, fold_params: bool, written: set[str]) -> bool:
    target = str(node.target)
    value = graph.attribute(target)
    if not isinstance(value, torch.Tensor) or target in written:
        return False
    if isinstance(value, torch.nn.Parameter):
        return fold_params
    return not any(target.startswith(prefix) for prefix in written if prefix.endswith("."))


def constant_nodes(graph: Graph, fold_params: bool = False) -> set[torch.fx.Node]:
    """Nodes whose value does not depend on the inputs and that may be computed ahead of time."""
    written = _written_attributes(graph)
    constant: set[torch.fx.Node] = set()
    for node in graph.fx.nodes:
        if node.op == "get_attr":
            if _is_constant_attribute(graph, node, fold_params, written):
                constant.add(node)
        elif _is_foldable_op(node) and all(arg in constant for arg in node.all_input_nodes):
            constant.add(node)
    return constant


# -- evaluation and choice ------------------------------------------------------------------
def _ancestors(roots: list[torch.fx.Node], within: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """`roots` inside `within` and everything they read inside it."""
    return {n for root in roots if root in within for n in ancestors(root, within) | {root}}


class _Evaluator:
    """Computes constant nodes once, in graph order; a node that fails to run has no value."""

    def __init__(self, graph: Graph, needed: set[torch.fx.Node]):
        self.values: dict[torch.fx.Node, Any] = {}
        with torch.no_grad():
            for node in graph.fx.nodes:
                if node in needed and all(arg in self.values for arg in node.all_input_nodes):
                    self._run(graph, node)

    def _run(self, graph: Graph, node: torch.fx.Node) -> None:
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda arg: self.values[arg])
        try:
            if node.op == "get_attr":
                self.values[node] = graph.attribute(str(node.target))
            elif node.op == "call_method":
                self.values[node] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                self.values[node] = _FUNCTIONAL_TWIN.get(node.target, node.target)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - an op that cannot run now is simply not folded
            log.debug("fold-constants: cannot evaluate %s: %s", node.format_node(), err)


def _constant_asserts(graph: Graph, constant: set[torch.fx.Node]) -> list[torch.fx.Node]:
    return [n for n in graph.fx.nodes if n.op == "call_function" and n.target in _CONSTANT_ASSERTS
            and n.all_input_nodes and all(arg in constant for arg in n.all_input_nodes)]


def plan_folding(graph: Graph, max_growth: float = 4.0, fold_params: bool = False) -> FoldPlan:
    """Decide which constant nodes to replace by buffers, and compute their values."""
    constant = constant_nodes(graph, fold_params)
    asserts = _constant_asserts(graph, constant)
    frontier = [n for n in graph.fx.nodes if n in constant and n.op != "get_attr"
                and any(user not in constant and user not in asserts for user in n.users)]
    evaluator = _Evaluator(graph, _ancestors(frontier + asserts, constant | set(asserts)))
    plan = FoldPlan()
    plan.asserts = [a.name for a in asserts if a in evaluator.values]
    chosen = _choose(frontier, constant, evaluator.values, max_growth, plan.skipped_large)
    order = {node: index for index, node in enumerate(graph.fx.nodes)}
    chosen.sort(key=order.__getitem__)
    plan.folds = _own_values(chosen, evaluator.values)
    kept_asserts = [a for a in asserts if a.name in plan.asserts]
    plan.cone = {n.name for n in _ancestors(chosen + kept_asserts, constant | set(kept_asserts))}
    return plan


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.numel() else -id(tensor)


def _own_values(chosen: list[torch.fx.Node], values: dict[torch.fx.Node, Any]) -> dict[str, torch.Tensor]:
    """The chosen values, each in storage of its own.

    A value that is a view (`t(%buf)`, a slice of a larger table) or the very tensor
    it was computed from is cloned, strides kept: a new buffer never aliases the
    user's tensors or another buffer, and never keeps a larger base alive.
    """
    taken = {_storage(v) for n, v in values.items() if n.op == "get_attr" and isinstance(v, torch.Tensor)}
    owned = {}
    for node in chosen:
        value = values[node]
        if _storage(value) in taken or value._base is not None:
            with torch.no_grad():
                value = value.clone(memory_format=torch.preserve_format)
        taken.add(_storage(value))
        owned[node.name] = value
    return owned


def _choose(frontier: list[torch.fx.Node], constant: set[torch.fx.Node], values: dict[torch.fx.Node, Any],
            max_growth: float, skipped_large: list[str]) -> list[torch.fx.Node]:
    """Frontier nodes whose value is a tensor of acceptable size; else try the nodes they read."""
    chosen: list[torch.fx.Node] = []
    work, seen = list(reversed(frontier)), set()
    while work:
        node = work.pop()
        if node in seen or node.op == "get_attr":
            continue
        seen.add(node)
        value = values.get(node)
        if isinstance(value, torch.Tensor) and not _too_large(node, value, constant, values, max_growth):
            chosen.append(node)
            continue
        if isinstance(value, torch.Tensor):
            skipped_large.append(node.name)
        work.extend(arg for arg in reversed(node.all_input_nodes) if arg in constant)
    return chosen


def _too_large(node: torch.fx.Node, value: torch.Tensor, constant: set[torch.fx.Node],
               values: dict[torch.fx.Node, Any], max_growth: float) -> bool:
    out_bytes = _nbytes(value)
    if out_bytes <= SMALL_BYTES:
        return False
    leaves = {id(values[n]): values[n] for n in _ancestors([node], constant) if n.op == "get_attr"}
    in_bytes = sum(_nbytes(t) for t in leaves.values())
    return out_bytes > max_growth * in_bytes


# -- rewriting --------------------------------------------------------------------------
def _apply(plan: FoldPlan, graph: Graph, pass_name: str) -> list[str]:
    """Put the planned buffers in place of their nodes, erase what only they read; return the buffers."""
    by_name = {node.name: node for node in graph.fx.nodes}
    build, paths = Builder(graph, pass_name), []
    for name, value in plan.folds.items():
        node = by_name[name]
        path = add_tensor(graph, FOLDED_MODULE, name, value)
        paths.append(path)
        with build.before(node) as at:
            replacement = at.get_attr(path)
        _carry_export_meta(node, replacement, value)
        node.replace_all_uses_with(replacement)
    for name in plan.asserts:
        graph.fx.erase_node(by_name[name])
    for node in reversed(list(graph.fx.nodes)):
        if node.name in plan.cone and not node.users:
            graph.fx.erase_node(node)
    return paths


def _carry_export_meta(node: torch.fx.Node, replacement: torch.fx.Node, value: torch.Tensor) -> None:
    """Keep export's shape metadata on the new get_attr where it still describes the value."""
    fake = node.meta.get("val")
    if isinstance(fake, torch.Tensor) and (fake.shape, fake.dtype, fake.stride()) == \
            (value.shape, value.dtype, value.stride()):
        for key in ("val", "tensor_meta"):
            if key in node.meta:
                replacement.meta[key] = node.meta[key]
