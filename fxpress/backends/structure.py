"""Structured inputs and outputs: compiled models take and return what the eager model does.

A captured model may take lists, dicts, strings or None and return dicts,
tuples or Python numbers; backends run flat tensors.  :func:`flatten_graph`
gives the backends a copy of the Graph's module that takes the tensor
leaves of the example inputs (the other leaves, which torch.export fixed
at capture, become constants), returns its output leaves as tensors (a
Python number as a 0-d tensor) and never writes into its inputs.
:class:`IOStructure` records both tree specs, the constants and the output
signature; a CompiledModel uses it to flatten and check a call's arguments
and to check and rebuild its outputs.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch.utils import _pytree as pytree

from fxpress.backends.signature import TensorSpec, dtype_str, torch_dtype
from fxpress.errors import ArtifactError, LoweringError, first_line
from fxpress.ir import Graph
from fxpress.ir.opinfo import op_label

aten = torch.ops.aten

SCALAR_KINDS = {bool: ("bool", torch.bool), int: ("int", torch.int64), float: ("float", torch.float64)}
JSON_CONSTANTS = (str, int, float, bool, type(None))


def _scalar_kind(value: Any) -> str | None:
    """"int", "float", "bool" for a Python (or symbolic) number, None for anything else."""
    if isinstance(value, torch.SymBool):
        return "bool"
    if isinstance(value, torch.SymInt):
        return "int"
    if isinstance(value, torch.SymFloat):
        return "float"
    for kind, (name, _) in SCALAR_KINDS.items():
        if type(value) is kind:  # noqa: E721 - bool is an int subclass
            return name
    return None


def describe(value: Any) -> str:
    """A short picture of a pytree of inputs: ``([tensor, tensor], 'attr')``."""
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, list):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(describe(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    return repr(value)


@dataclass
class IOStructure:
    """How a compiled model's flat tensors map to the eager model's arguments and result.

    in_spec: tree spec of the argument tuple; constants: leaf index -> the value torch.export fixed;
    out_spec: tree spec of the result; kinds: per output leaf, "tensor" or a Python number type;
    outputs: the signature of every output leaf (0-d for numbers).
    """

    in_spec: pytree.TreeSpec
    constants: dict[int, Any]
    out_spec: pytree.TreeSpec
    kinds: list[str]
    outputs: list[TensorSpec] = field(default_factory=list)

    # -- inputs ------------------------------------------------------------------------
    def expected_inputs(self) -> str:
        leaves = [self.constants.get(i, _TensorMark()) for i in range(self.in_spec.num_leaves)]
        return describe(pytree.tree_unflatten(leaves, self.in_spec))

    def flatten(self, args: tuple) -> tuple:
        """The tensor leaves of `args`; ArtifactError when the structure or a constant differs."""
        leaves, spec = pytree.tree_flatten(tuple(args))
        if spec != self.in_spec:
            count = self.in_spec.num_children
            if len(args) != count:
                raise ArtifactError(f"expected {count} inputs {self.expected_inputs()}, got {len(args)}: "
                                    f"{describe(tuple(args))}")
            raise ArtifactError(f"expected inputs {self.expected_inputs()}, got {describe(tuple(args))}")
        tensors = []
        for index, leaf in enumerate(leaves):
            if index in self.constants:
                want = self.constants[index]
                if isinstance(leaf, torch.Tensor) or leaf != want:
                    raise ArtifactError(f"input leaf {index} was fixed at {want!r} when the model was captured, "
                                        f"got {describe(leaf)}; capture again with the value you need")
            else:
                tensors.append(leaf)
        return tuple(tensors)

    def unflatten_inputs(self, tensors: tuple) -> tuple:
        """Arguments of the eager model's structure around `tensors` (the inverse of flatten)."""
        values = iter(tensors)
        leaves = [self.constants[i] if i in self.constants else next(values) for i in range(self.in_spec.num_leaves)]
        return tuple(pytree.tree_unflatten(leaves, self.in_spec))

    # -- outputs -----------------------------------------------------------------------
    def restore(self, outputs: list[torch.Tensor], backend: str) -> Any:
        """Check every output against the signature, then rebuild the eager model's result."""
        if len(outputs) != len(self.kinds):
            raise LoweringError(f"the {backend} backend returned {len(outputs)} outputs, the captured graph "
                                f"has {len(self.kinds)}; report this and compile for another target meanwhile")
        for index, (spec, value) in enumerate(zip(self.outputs, outputs)):
            if not spec.accepts(value):
                raise LoweringError(
                    f"output {index} of the {backend} backend is {dtype_str(value.dtype)}{list(value.shape)}, the "
                    f"captured graph gives {spec.type_str()}; the backend lowered an op wrongly: report it and "
                    f"compile for another target meanwhile")
        leaves = [value if kind == "tensor" else _to_python(value, kind) for value, kind in zip(outputs, self.kinds)]
        return pytree.tree_unflatten(leaves, self.out_spec)

    # -- saving ------------------------------------------------------------------------
    def to_json(self) -> dict:
        try:
            specs = pytree.treespec_dumps(self.in_spec), pytree.treespec_dumps(self.out_spec)
        except Exception as err:  # noqa: BLE001 - a container type without a serialized form
            raise ArtifactError(f"cannot save a model whose inputs or outputs use a container without a "
                                f"serialized tree spec ({err}); return tuples, lists or dicts instead") from err
        return {"in_spec": specs[0], "out_spec": specs[1], "kinds": list(self.kinds),
                "constants": [[index, value] for index, value in sorted(self.constants.items())],
                "outputs": [spec.to_json() for spec in self.outputs]}

    @classmethod
    def from_json(cls, record: dict) -> IOStructure:
        try:
            return cls(in_spec=pytree.treespec_loads(record["in_spec"]),
                       out_spec=pytree.treespec_loads(record["out_spec"]),
                       constants={int(index): value for index, value in record["constants"]},
                       kinds=[str(kind) for kind in record["kinds"]],
                       outputs=[TensorSpec.from_json(spec) for spec in record["outputs"]])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            raise ArtifactError(f"malformed input/output structure in manifest: {err}") from err


class _TensorMark:
    def __repr__(self) -> str:
        return "tensor"


def _to_python(value: torch.Tensor, kind: str) -> Any:
    number = value.item()
    return {"int": int, "float": float, "bool": bool}[kind](number)


# -- the flat module the backends export ------------------------------------------------------
def _output_leaves(graph: Graph) -> list[Any]:
    """The output node's leaves (nodes or literals): flat already when the code rebuilds a tree spec."""
    output = next(n for n in graph.fx.nodes if n.op == "output")
    info = getattr(graph.fx._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        value = output.args[0]
        return list(value) if isinstance(value, (tuple, list)) else [value]
    return pytree.tree_leaves(output.args[0])


def flatten_graph(graph: Graph) -> tuple[torch.fx.GraphModule, IOStructure, list[str]]:
    """A GraphModule over flat tensors computing `graph`, its IOStructure (without output signature),
    and the names of its tensor inputs.  Parameters keep their names (the module shares them)."""
    args = tuple(graph.example_inputs)
    leaves, in_spec = pytree.tree_flatten(args)
    with torch.no_grad():  # on copies: the model may write into its inputs
        result = graph.module(*pytree.tree_map_only(torch.Tensor, torch.clone, args))
    values, out_spec = pytree.tree_flatten(result)
    new = graph.copy()
    placeholders = [n for n in new.fx.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves):
        raise LoweringError(f"graph {graph.name} has {len(placeholders)} inputs but its example inputs "
                            f"{describe(args)} have {len(leaves)} leaves; capture it with method='export'")
    constants = _inline_constants(graph.name, new.fx, placeholders, leaves)
    outputs = _output_leaves(new)
    if len(outputs) != len(values):
        raise LoweringError(f"graph {graph.name} returns {len(outputs)} values in its code but {len(values)} "
                            f"when run ({describe(result)}); capture it with method='export'")
    kinds = _tensor_outputs(graph.name, new.fx, outputs, values)
    new.fx._codegen = torch.fx.graph.CodeGen()
    new.module.recompile()
    names = [n.name for n in new.fx.nodes if n.op == "placeholder"]
    return new.module, IOStructure(in_spec, constants, out_spec, kinds), names


def _inline_constants(name: str, fx: torch.fx.Graph, placeholders: list, leaves: list) -> dict[int, Any]:
    """Replace each placeholder of a non-tensor leaf by its value; return leaf index -> value."""
    constants: dict[int, Any] = {}
    for index, (node, leaf) in enumerate(zip(placeholders, leaves)):
        if isinstance(leaf, torch.Tensor):
            continue
        if not isinstance(leaf, JSON_CONSTANTS):
            raise LoweringError(f"input {node.name} of graph {name} is a {type(leaf).__name__}; compiled models "
                                "take tensors, numbers, strings and None (in tuples, lists and dicts)")
        for user in list(node.users):
            user.args = torch.fx.node.map_arg(user.args, lambda arg, n=node, v=leaf: v if arg is n else arg)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda arg, n=node, v=leaf: v if arg is n else arg)
        fx.erase_node(node)
        constants[index] = leaf
    return constants


def _tensor_outputs(name: str, fx: torch.fx.Graph, outputs: list, values: list) -> list[str]:
    """Make every output a tensor (numbers become 0-d tensors); return each output's kind."""
    output = next(n for n in fx.nodes if n.op == "output")
    kinds, returned = [], []
    for leaf, value in zip(outputs, values):
        if isinstance(value, torch.Tensor):
            kinds.append("tensor")
            returned.append(leaf)
            continue
        kind = _scalar_kind(value)
        if kind is None:
            raise LoweringError(f"graph {name} returns a {type(value).__name__}; compiled models return tensors "
                                "and Python numbers (in tuples, lists and dicts)")
        kinds.append(kind)
        with fx.inserting_before(output):
            returned.append(fx.call_function(aten.scalar_tensor.default, (leaf,),
                                             {"dtype": dict(SCALAR_KINDS.values())[kind]}))
    output.args = (tuple(returned),)
    return kinds


def output_specs(program: torch.export.ExportedProgram) -> list[TensorSpec]:
    """The signature of every user output of `program`: symbolic dims are dynamic."""
    output = next(n for n in program.graph.nodes if n.op == "output")
    user = set(program.graph_signature.user_outputs)
    specs = []
    for node in output.args[0]:
        if not isinstance(node, torch.fx.Node) or node.name not in user:
            continue
        fake = node.meta.get("val")
        if not isinstance(fake, torch.Tensor):
            raise LoweringError(f"output {node.format_node()} has no tensor metadata after export")
        dynamic = {i: str(d) for i, d in enumerate(fake.shape) if not isinstance(d, int)}
        shape = tuple(d if isinstance(d, int) else 1 for d in fake.shape)
        specs.append(TensorSpec(name=node.name, shape=shape, dtype=dtype_str(fake.dtype), dynamic=dynamic))
    return specs


def example_tensor(spec: TensorSpec) -> torch.Tensor:
    dtype = torch_dtype(spec.dtype)
    return torch.zeros(spec.shape, dtype=dtype) if dtype.is_floating_point else torch.ones(spec.shape, dtype=dtype)


# -- the export every backend starts from ----------------------------------------------------
@dataclass
class FlatExport:
    """The Graph re-exported over flat tensors, its input signature and its IOStructure."""

    program: torch.export.ExportedProgram
    inputs: list[TensorSpec]
    structure: IOStructure

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.program.example_inputs[0])


def _leaf_dynamic_dims(graph: Graph, dynamic: bool) -> list[dict[int, str]]:
    """Per tensor leaf of the example inputs, its dynamic dims (dim -> label); none unless `dynamic`."""
    args = tuple(graph.example_inputs)
    shapes = graph.dynamic_shapes if dynamic else None
    if isinstance(shapes, dict):  # keyed by argument name, in call order
        shapes = list(shapes.values())
    if shapes and (not isinstance(shapes, (tuple, list)) or len(shapes) != len(args)):
        raise LoweringError(f"graph {graph.name}'s dynamic_shapes has a form the backends do not read "
                            f"({type(shapes).__name__}); give one entry per input, as fxpress.capture does")
    dims: list[dict[int, str]] = []
    for index, arg in enumerate(args):
        tensors = [leaf for leaf in pytree.tree_leaves(arg) if isinstance(leaf, torch.Tensor)]
        wanted = shapes[index] if shapes else None
        if isinstance(arg, torch.Tensor):
            axes = wanted if isinstance(wanted, dict) else {d: 0 for d, v in enumerate(wanted or ()) if v is not None}
            dims.append({int(d): f"d{d}" for d in axes})
            continue
        if wanted:
            raise LoweringError(f"input {index} of graph {graph.name} is a {type(arg).__name__} with dynamic dims; "
                                "compile with dynamic=False, or make only top-level tensor inputs dynamic")
        dims.extend({} for _ in tensors)
    return dims


def _export(module: torch.nn.Module, tensors: tuple, dims: list[dict[int, str]], name: str,
            backend: str) -> torch.export.ExportedProgram:
    shapes = tuple({d: torch.export.Dim.DYNAMIC for d in found} or None for found in dims) \
        if any(dims) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, tensors, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # noqa: BLE001 - torch.export raises many kinds
        raise LoweringError(f"{backend} backend: cannot re-export graph {name}: {type(err).__name__}: "
                            f"{first_line(err)}") from err


def _view_source(node: Any) -> Any:
    """The placeholder or attribute a view chain (``t``, ``view``, ``slice``...) starts from."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            isinstance(node.target, torch._ops.OpOverload) and node.args and \
            any(ret.alias_info is not None for ret in node.target._schema.returns):
        node = node.args[0]
    return node


def written_sources(fx: torch.fx.Graph) -> dict[torch.fx.Node, torch.fx.Node]:
    """Placeholders and attributes some op writes into (through views too) -> the first such op."""
    written: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in fx.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for index, arg in enumerate(node.target._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.kwargs.get(arg.name, node.args[index] if index < len(node.args) else None)
            source = _view_source(value)
            if isinstance(source, torch.fx.Node) and source.op in ("placeholder", "get_attr"):
                written.setdefault(source, node)
    return written


def _copy_written_inputs(name: str, module: torch.fx.GraphModule) -> None:
    """Make the graph write into copies of its inputs, never into the caller's tensors; refuse writes
    into the model's own tensors (compiled models hold no state)."""
    written = written_sources(module.graph)
    for source, writer in written.items():
        if source.op == "get_attr":
            raise LoweringError(f"op {op_label(writer.target)} at node {writer.name} of graph {name} writes into "
                                f"the model's tensor {source.target} on every call, and compiled models hold no "
                                "state; compute it from the inputs instead, or call model.eval() before "
                                "fxpress.capture if it is a training-mode statistic")
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    for source in (n for n in placeholders if n in written):
        with module.graph.inserting_after(placeholders[-1]):
            copy = module.graph.call_function(aten.clone.default, (source,))
        source.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)
    module.recompile()


def export_flat(graph: Graph, dynamic: bool, backend: str,
                prepare: Callable[[torch.fx.GraphModule], None] | None = None) -> FlatExport:
    """Re-export `graph` over its flat tensor inputs (dynamic dims kept when `dynamic`), for `backend`.

    Compiled models are functional: an input the model writes into is copied first, and a model that
    updates its own buffers is refused (compiled models hold no state).
    """
    module, structure, names = flatten_graph(graph)
    _copy_written_inputs(graph.name, module)
    if prepare is not None:  # the backend's own rewrites (fxpress.backends.onnx_fixes)
        prepare(module)
    tensors = tuple(leaf for leaf in pytree.tree_leaves(tuple(graph.example_inputs)) if isinstance(leaf, torch.Tensor))
    dims = _leaf_dynamic_dims(graph, dynamic)
    program = _export(module, tensors, dims, graph.name, backend)
    structure.outputs = output_specs(program)
    inputs = [TensorSpec(name=name, shape=tuple(t.shape), dtype=dtype_str(t.dtype), dynamic=found)
              for name, t, found in zip(names, tensors, dims)]
    return FlatExport(program, inputs, structure)
