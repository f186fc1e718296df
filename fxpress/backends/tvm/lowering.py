"""IR Graph -> Relax IRModule plus its parameters.

The Graph's GraphModule is re-exported with ``torch.export`` (non-strict),
decomposed to core ATen, checked against the importer and the rule table
(:mod:`fxpress.backends.tvm.rules`), then imported with
``tvm.relax.frontend.torch.from_exported_program``.  Parameters stay
inputs of ``main`` (after the user inputs) so they can be saved as
safetensors beside the compiled library.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fxpress.backends.signature import TensorSpec
from fxpress.backends.structure import FlatExport, IOStructure, export_flat
from fxpress.backends.tvm import load_rules, rules
from fxpress.errors import LoweringError
from fxpress.ir import Graph

log = logging.getLogger(__name__)


@dataclass
class Lowered:
    """A Relax module whose ``main`` takes (*inputs, *params), and the params in that order."""

    mod: object  # tvm.IRModule
    param_names: list[str]
    params: dict[str, np.ndarray]
    inputs: list[TensorSpec]
    structure: IOStructure


def export_graph(graph: Graph, dynamic: bool) -> tuple[torch.export.ExportedProgram, FlatExport]:
    """Re-export the Graph over flat tensors and decompose it to core ATen (custom ops are kept)."""
    from fxpress.backends.tvm.aten_rules import kept_whole

    flat = export_flat(graph, dynamic, "tvm", prepare=buffers_as_parameters)
    table = torch.export.default_decompositions()
    for op in kept_whole(flat.program):  # lowered by a rule of their own (aten_rules)
        table.pop(op)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flat.program.run_decompositions(table), flat
    except Exception as err:  # noqa: BLE001 - decompositions raise many kinds
        raise LoweringError(f"cannot decompose graph {graph.name} for lowering: "
                            f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err


def buffers_as_parameters(module: torch.nn.Module) -> None:
    """Register the (flattened copy's) buffers as frozen parameters, so they reach Relax as params.

    TVM's importer binds buffers as constants inside ``main``; work that depends only on them (the
    repacking of quantized codes and scales, a folded norm's statistics) then ran on every call instead
    of once in ``main_transform_params`` (SmolLM2's int4 decode step repacked all 210 linears' codes each
    step: 15 of 40 ms).  A tensor shared by several modules becomes one parameter.
    """
    frozen: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for name, tensor in list(sub._buffers.items()):
            if tensor is None:
                continue
            if id(tensor) not in frozen:
                frozen[id(tensor)] = torch.nn.Parameter(tensor, requires_grad=False)
            del sub._buffers[name]
            sub._non_persistent_buffers_set.discard(name)
            sub.register_parameter(name, frozen[id(tensor)])


def torch_dtype_name(dtype: torch.dtype) -> str:
    """torch.int64 -> "int64" (the TVM name)."""
    return str(dtype).removeprefix("torch.")


def _known_ops() -> set[str]:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return {key for key in ExportedProgramImporter().convert_map if isinstance(key, str)}


def to_relax(graph: Graph, *, dynamic: bool = False) -> Lowered:
    """Lower `graph` to Relax; raise LoweringError naming the op and node that cannot be lowered."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    load_rules()  # the one list of rule modules (fxpress/backends/tvm/__init__.py)
    program, flat = export_graph(graph, dynamic)
    nodes = list(program.graph.nodes)
    rules.check_lowerable(nodes, _known_ops())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = from_exported_program(program, keep_params_as_input=True, unwrap_unit_return_tuple=True,
                                        custom_convert_map=rules.custom_convert_map(nodes),
                                        run_ep_decomposition=False)
    except LoweringError:
        raise
    except Exception as err:  # noqa: BLE001 - the importer raises many kinds
        raise LoweringError(f"TVM's importer failed on graph {graph.name}: {type(err).__name__}: "
                            f"{str(err).strip().splitlines()[-1][:400]}") from err
    mod, detached = relax.frontend.detach_params(mod)
    values = detached.get("main", [])
    num_inputs = int(mod["main"].attrs["num_input"])
    names = [var.name for var in mod["main"].params[num_inputs:]]
    if len(names) != len(values):
        raise LoweringError(f"importer gave {len(values)} params for {len(names)} parameter inputs")
    params = {name: value.numpy() for name, value in zip(names, values)}
    log.info("lowered %s to Relax: %d inputs, %d params", graph.name, num_inputs, len(names))
    return Lowered(mod=mod, param_names=names, params=params, inputs=flat.inputs, structure=flat.structure)


def bound_dynamic_dims(lowered: Lowered, max_sizes: int | dict[str, int], name: str) -> dict[str, int]:
    """Bound the dynamic dims of `lowered`'s inputs by `max_sizes`; returns {TIR variable: bound} for
    ``tir_var_upper_bound``, which lets ``StaticPlanBlockMemory`` plan a dynamic build's symbolic-size
    intermediates into a few shared storages of the bounded size, as a static build's are (without a
    bound each is a storage of its own: 230 storage allocations a call of a merged dynamic-batch ViT, 12
    with one).  The bounds enter the input signature, so a larger input is refused by name instead of
    overrunning the planned storage.

    max_sizes: one bound for every dynamic dim, or {label: bound} by the labels of the signature
    (``d0``: dim 0 of each input).
    """
    from tvm import tirx

    labels = sorted({label for spec in lowered.inputs for label in spec.dynamic.values()})
    if not labels:
        raise LoweringError(f"max_sizes bounds dynamic dims, and graph {name} compiles with none: "
                            "compile with dynamic=True (of a graph captured with dynamic dims), or without max_sizes")
    if not isinstance(max_sizes, (int, dict)):
        raise LoweringError(f"max_sizes must be an int or a dict {{label: int}}, got {type(max_sizes).__name__}")
    wanted = dict.fromkeys(labels, max_sizes) if isinstance(max_sizes, int) else dict(max_sizes)
    unknown = sorted(set(wanted) - set(labels))
    if unknown:
        raise LoweringError(f"max_sizes names {', '.join(map(repr, unknown))}, not dynamic dims of graph {name}; "
                            f"its dynamic dims are {', '.join(map(repr, labels))}")
    for label, bound in wanted.items():
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
            raise LoweringError(f"max_sizes[{label!r}] must be an int >= 1, got {bound!r}")
    bounds: dict[str, int] = {}
    variables: list[dict[int, str]] = []  # per input: dim -> its TIR variable's name
    for spec, param in zip(lowered.inputs, lowered.mod["main"].params):
        variables.append({})
        for d, label in spec.dynamic.items():
            if label not in wanted:
                continue
            if spec.shape[d] > wanted[label]:
                raise LoweringError(f"max_sizes[{label!r}] = {wanted[label]} is below the example input "
                                    f"{spec.name}'s size {spec.shape[d]}: raise the bound")
            var = param.ty.shape.values[d]
            if not isinstance(var, tirx.Var):
                raise LoweringError(f"dim {d} of input {spec.name} is {var} in Relax, not a variable: "
                                    "it cannot be bounded; compile without max_sizes")
            bounds[var.name] = min(wanted[label], bounds.get(var.name, wanted[label]))
            variables[-1][d] = var.name
    specs = [TensorSpec(spec.name, spec.shape, spec.dtype, dict(spec.dynamic),
                        {d: bounds[var] for d, var in found.items()})
             for spec, found in zip(lowered.inputs, variables)]
    lowered.inputs = specs
    return bounds
