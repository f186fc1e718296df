"""The IR: an FX GraphModule plus metadata on every node.

`Graph` wraps a `torch.fx.GraphModule` whose nodes are ATen ops (from
torch.export) or module calls (from symbolic_trace).  `annotate()` runs
the graph once on its example inputs and writes a `NodeInfo` into
`node.meta["fxpress"]`: output shape and dtype, owning module path, the
parameters the node reads, and its MACs.  Whole-graph figures (params,
bytes, MACs, per-module MACs) are sums over those records.

Parameters are shared, not copied, between a graph and its copies: a
pass that changes weights must put new tensors in place of the old ones
(never write into a tensor in place), or copy with `clone_params=True`.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx

from fxpress.ir.opinfo import node_macs, op_info

META_KEY = "fxpress"

_DTYPE_NAMES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short, stable dtype name used in dumps (`f32`, `i64`, ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class NodeInfo:
    """What fxpress knows about one node after `annotate()`."""

    shape: tuple[int, ...] | None  # first tensor output; None when the node yields no tensor
    dtype: str | None
    module_path: str  # owning module, "" for the top level
    module_type: str  # class name of the owning module, "" when unknown
    params: tuple[str, ...]  # attribute paths of the parameters/buffers the node reads
    macs: int
    extra_outputs: tuple[tuple[tuple[int, ...], str], ...] = ()  # further tensor outputs


def shape_of(node: Any) -> tuple[int, ...]:
    """The recorded output shape of a node (() for non-nodes and nodes without a tensor)."""
    record = node.meta.get(META_KEY) if isinstance(node, torch.fx.Node) else None
    return tuple(record.shape) if record is not None and record.shape is not None else ()


def module_macs(node: torch.fx.Node, module: torch.nn.Module, out_shape: tuple[int, ...] | None) -> int:
    """MACs of a leaf module called from a symbolically traced graph: its class's OpInfo rule, which
    receives the shapes of the module's parameters (weight first)."""
    info = op_info(type(module))
    if info is None or info.macs is None or out_shape is None:
        return 0
    return int(info.macs(node, [tuple(p.shape) for p in module.parameters()], out_shape))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def owning_module(node: torch.fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module that emitted `node`."""
    if node.op == "call_module":
        return str(node.target), ""
    if node.op == "get_attr":
        path = str(node.target).rpartition(".")[0]
        return path, ""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    if str(path).startswith("_empty_nn_module_stack"):  # torch.export's marker for "no module"
        return "", ""
    cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2]
    return str(path), cls_name


EXPORT_SHAPE_KEYS = ("val", "tensor_meta")


def export_meta_agrees(node: torch.fx.Node, value: Any) -> bool:
    """Whether torch.export's `meta["val"]` of `node` describes `value` (shapes and dtypes; a symbolic
    dim agrees with any size).  True when there is no such metadata."""
    fake = node.meta.get("val")
    if fake is None:
        return True
    fakes, reals = _tensors(fake), _tensors(value)
    if len(fakes) != len(reals):
        return not fakes and not reals
    for f, r in zip(fakes, reals):
        if f.dtype != r.dtype or f.dim() != r.dim():
            return False
        if any(isinstance(a, int) and a != b for a, b in zip(f.shape, r.shape)):
            return False
    return True


def drop_stale_export_meta(node: torch.fx.Node, value: Any) -> None:
    """Drop torch.export's shape metadata where a rewrite made it wrong (NodeInfo is the truth)."""
    if not export_meta_agrees(node, value):
        for key in EXPORT_SHAPE_KEYS:
            node.meta.pop(key, None)


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once and records every node's output."""

    def __init__(self, module: torch.fx.GraphModule):
        super().__init__(module, garbage_collect_values=False)
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n] = result
        return result


class Graph:
    """An FX graph with per-node metadata; the unit every pass consumes and returns."""

    def __init__(self, module: torch.fx.GraphModule, example_inputs: tuple, *, name: str = "model",
                 source: str = "export", dynamic_shapes: Any = None):
        self.module = module
        self.example_inputs = tuple(example_inputs)
        self.name = name
        self.source = source
        self.dynamic_shapes = dynamic_shapes
        self.version = 0  # bumped by annotate(): cached analyses of an older version are stale
        # Sparsity masks by attribute path (True where a weight is kept): what a pruning pass fixed at
        # zero; training passes (distill) re-apply them after every step so pruned weights stay zero.
        self.masks: dict[str, torch.Tensor] = {}
        # How capture called the model, when it wrapped it (a Hugging Face model: inputs, output, dynamic dims).
        self.wrapper: str | None = None

    # -- structure -----------------------------------------------------------------
    @property
    def fx(self) -> torch.fx.Graph:
        return self.module.graph

    @property
    def nodes(self) -> list[torch.fx.Node]:
        return list(self.module.graph.nodes)

    def info(self, node: torch.fx.Node) -> NodeInfo:
        record = node.meta.get(META_KEY)
        if record is None:
            from fxpress.errors import VerificationError
            raise VerificationError(
                f"node has no fxpress metadata: {node.format_node()}; call graph.annotate() after rewriting")
        return record

    def attribute(self, path: str) -> Any:
        """The tensor or module at an attribute path such as `blocks.0.fc.weight`."""
        owner, _, leaf = path.rpartition(".")
        return getattr(self.module.get_submodule(owner) if owner else self.module, leaf)

    def referenced_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer the graph reads, by attribute path."""
        found: dict[str, torch.Tensor] = {}
        for node in self.fx.nodes:
            if node.op == "get_attr":
                value = self.attribute(str(node.target))
                if isinstance(value, torch.Tensor):
                    found[str(node.target)] = value
            elif node.op == "call_module":
                sub = self.module.get_submodule(str(node.target))
                for name, tensor in list(sub.named_parameters()) + list(sub.named_buffers()):
                    found[f"{node.target}.{name}"] = tensor
        return found

    # -- figures -------------------------------------------------------------------
    def _unique(self, parameters_only: bool) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for tensor in self.referenced_tensors().values():
            if parameters_only and not isinstance(tensor, torch.nn.Parameter):
                continue
            seen.setdefault(id(tensor), tensor)
        return list(seen.values())

    @property
    def num_params(self) -> int:
        """Unique parameters the graph reads (a tensor read twice counts once)."""
        return sum(t.numel() for t in self._unique(parameters_only=True))

    @property
    def param_bytes(self) -> int:
        """Bytes of the unique parameters and buffers the graph reads."""
        return sum(t.numel() * t.element_size() for t in self._unique(parameters_only=False))

    @property
    def macs(self) -> int:
        return sum(self.info(n).macs for n in self.fx.nodes)

    @property
    def flops(self) -> int:
        """Floating-point operations of the MAC-counted ops (2 per MAC)."""
        return 2 * self.macs

    @property
    def num_nodes(self) -> int:
        return len(self.fx.nodes)

    def macs_by_module(self, depth: int | None = None) -> dict[str, int]:
        """MACs summed per owning module path, truncated to `depth` components."""
        totals: dict[str, int] = {}
        for node in self.fx.nodes:
            record = self.info(node)
            if not record.macs:
                continue
            path = record.module_path
            if depth is not None:
                path = ".".join(path.split(".")[:depth])
            totals[path] = totals.get(path, 0) + record.macs
        return dict(sorted(totals.items()))

    def figures(self) -> dict[str, int]:
        """The numbers a pass report shows: nodes, params, bytes, MACs."""
        return {"nodes": self.num_nodes, "params": self.num_params,
                "bytes": self.param_bytes, "macs": self.macs}

    # -- execution -----------------------------------------------------------------
    def __call__(self, *inputs: Any) -> Any:
        with torch.no_grad():
            return self.module(*inputs)

    def annotate(self) -> Graph:
        """Run once on the example inputs and (re)write every node's NodeInfo."""
        self.version += 1
        recorder = _Recorder(self.module)
        with torch.no_grad():
            recorder.run(*self._flat_inputs(self.example_inputs))
        for node in self.fx.nodes:
            value = recorder.values.get(node)
            node.meta[META_KEY] = self._node_info(node, value)
            drop_stale_export_meta(node, value)
        return self

    def _flat_inputs(self, inputs: tuple) -> list[Any]:
        flat, _ = torch.utils._pytree.tree_flatten(list(inputs))
        return flat

    def _node_info(self, node: torch.fx.Node, value: Any) -> NodeInfo:
        tensors = _tensors(value) if node.op != "output" else []
        first = tensors[0] if tensors else None
        path, cls = owning_module(node)
        params = tuple(str(a.target) for a in node.all_input_nodes if a.op == "get_attr")
        if node.op == "get_attr":
            params = (str(node.target),)
        arg_shapes = [self._arg_shape(a) for a in (*node.args, *node.kwargs.values())]
        shape = tuple(first.shape) if first is not None else None
        if node.op == "call_module":
            sub = self.module.get_submodule(str(node.target))
            cls = type(sub).__name__
            params = tuple(f"{node.target}.{n}" for n, _ in sub.named_parameters())
            macs = module_macs(node, sub, shape)
        else:
            macs = node_macs(node, arg_shapes, shape) if node.op == "call_function" else 0
        return NodeInfo(shape=shape, dtype=dtype_name(first.dtype) if first is not None else None,
                        module_path=path, module_type=cls, params=params, macs=macs,
                        extra_outputs=tuple((tuple(t.shape), dtype_name(t.dtype)) for t in tensors[1:]))

    @staticmethod
    def _arg_shape(arg: Any) -> tuple[int, ...] | None:
        if isinstance(arg, torch.fx.Node):
            record = arg.meta.get(META_KEY)
            return record.shape if record is not None else None
        return None

    # -- copies and cleanup ---------------------------------------------------------
    def copy(self, clone_params: bool = False) -> Graph:
        """A new Graph whose FX graph can be rewritten without touching this one.

        Tensors are shared unless `clone_params`; rewrites replace tensors, never
        write into them.
        """
        memo: dict[int, Any] = {}
        if not clone_params:
            for tensor in list(self.module.parameters()) + list(self.module.buffers()):
                memo[id(tensor)] = tensor
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = copy.deepcopy(self.module, memo)
        new = Graph(module, self.example_inputs, name=self.name, source=self.source,
                    dynamic_shapes=self.dynamic_shapes)
        new.masks = dict(self.masks)
        new.wrapper = self.wrapper
        return new

    def owned_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the module holds: parameters, buffers and plain tensor attributes."""
        found: dict[str, torch.Tensor] = {}
        for prefix, sub in self.module.named_modules(remove_duplicate=False):
            for leaf, value in list(sub._parameters.items()) + list(sub._buffers.items()) + \
                    [(k, v) for k, v in vars(sub).items() if isinstance(v, torch.Tensor)]:
                if value is not None:
                    found[f"{prefix}.{leaf}" if prefix else leaf] = value
        return found

    def used_submodules(self) -> set[str]:
        """Paths of the submodules nodes use: called ones, and the subgraphs of higher-order ops
        (``torch.cond``'s branches, ``map``'s body), which the op's node reads with get_attr."""
        used = {str(n.target) for n in self.fx.nodes if n.op == "call_module"}
        for node in self.fx.nodes:
            if node.op == "get_attr" and isinstance(self.attribute(str(node.target)), torch.nn.Module):
                used.add(str(node.target))
        return used

    def unused_attributes(self) -> list[str]:
        """Paths of tensors the module holds but no node reads."""
        used = set(self.referenced_tensors())
        called = tuple(f"{path}." for path in self.used_submodules())
        return [name for name in self.owned_tensors() if name not in used and not name.startswith(called)]

    def remove_unused_attributes(self) -> list[str]:
        """Delete tensors no node reads, then submodules left empty; return the tensor paths."""
        removed = self.unused_attributes()
        for name in removed:
            owner, _, leaf = name.rpartition(".")
            delattr(self.module.get_submodule(owner) if owner else self.module, leaf)
        called = self.used_submodules()
        holders = {name.rpartition(".")[0] for name in self.owned_tensors()}
        for name, _ in sorted(self.module.named_modules(), key=lambda kv: -len(kv[0])):
            inside_used = name.startswith(tuple(f"{path}." for path in called))
            if name and name not in called and not inside_used and not any(
                    h == name or h.startswith(name + ".") for h in holders | called):
                owner, _, leaf = name.rpartition(".")
                delattr(self.module.get_submodule(owner) if owner else self.module, leaf)
        return removed

    def recompile(self) -> Graph:
        """Regenerate the module's code after a rewrite and refresh metadata."""
        self.module.recompile()
        return self.annotate()

    def __repr__(self) -> str:
        return (f"Graph({self.name!r}, nodes={self.num_nodes}, params={self.num_params:,}, "
                f"source={self.source})")

    def __iter__(self) -> Iterator[torch.fx.Node]:
        return iter(self.fx.nodes)
