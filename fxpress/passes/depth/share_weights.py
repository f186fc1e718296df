"""share-weights: consecutive blocks in a group read one set of weights (norm layers stay per block).

FoldGPT's group parameter sharing.  The residual blocks (see
:mod:`fxpress.analysis.blocks`) are cut into groups of ``group`` consecutive
blocks; in each group every block's get_attr nodes for non-norm tensors
are pointed at one tensor per weight:

- ``policy=first``: the first block's tensor;
- ``policy=mean``: a new tensor, the mean of the group's tensors, stored
  at the first block's path.

The other blocks' tensors are then unread and deleted, so the graph holds
one copy (``Graph.num_params`` counts a tensor once) and a saved artifact
stores it once (``fxpress.export.hf.save_weights``).  Norm tensors
(read by a module whose type name contains "Norm", or by a norm op) stay
per block so distillation can re-adapt them.  Stats report unique
parameters against executed parameters (each read counted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import Node

from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph
from fxpress.ir.opinfo import op_info
from fxpress.ops.binary import MST_OPS
from fxpress.ops.quant import QUANTIZED_OPS
from fxpress.analysis.blocks import Block, BlockStack, no_blocks_reason
from fxpress.analysis.manager import MainBlockStack
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass

aten = torch.ops.aten

def executed_params(graph: Graph) -> int:
    """Parameters as the code runs them: each get_attr read of a Parameter counted."""
    total = 0
    for node in graph.fx.nodes:
        if node.op == "get_attr":
            value = graph.attribute(str(node.target))
            if isinstance(value, torch.nn.Parameter):
                total += value.numel()
    return total


def is_norm_param(graph: Graph, attr: Node) -> bool:
    """Whether a get_attr node feeds a normalization (by op, or by its reader's module type)."""
    def reads_as_norm(user: Node) -> bool:
        info = op_info(user.target)
        return (info is not None and info.category == "norm") or "norm" in graph.info(user).module_type.lower()

    return any(reads_as_norm(user) for user in attr.users)


def _relative(block: Block, target: str, stack: BlockStack) -> str:
    """`target` relative to the block path it lives under (`self_attn.q_proj.weight`)."""
    for other in stack.blocks:
        if target.startswith(other.path + "."):
            return target[len(other.path) + 1:]
    raise PreconditionError(f"block {block.path} reads {target}, which lies in no block", ShareWeights.name)


def _shared_attrs(graph: Graph, block: Block, stack: BlockStack) -> dict[str, list[Node]]:
    """relative name -> get_attr nodes of the block's non-norm tensors."""
    nodes = {n.name: n for n in graph.fx.nodes}
    found: dict[str, list[Node]] = {}
    for name in block.nodes:
        for arg in nodes[name].all_input_nodes:
            if arg.op == "get_attr" and not is_norm_param(graph, arg):
                found.setdefault(_relative(block, str(arg.target), stack), []).append(arg)
    return {k: list(dict.fromkeys(v)) for k, v in found.items()}


def _group_tensor(graph: Graph, owner: Block, sources: list[str], relative: str, policy: str) -> str:
    """Attribute path of the tensor the group shares for `relative`; a new one for `mean`."""
    target = f"{owner.path}.{relative}"
    if policy == "first":
        return target
    tensors = [graph.attribute(source) for source in sources]
    if any(t.shape != tensors[0].shape for t in tensors):
        raise PreconditionError(f"cannot average {relative}: shapes differ across the group", ShareWeights.name)
    original = tensors[0]
    with torch.no_grad():
        mean = torch.stack([t.detach() for t in tensors]).mean(0)
    module_path, _, leaf = target.rpartition(".")
    holder = graph.module.get_submodule(module_path)
    delattr(holder, leaf)
    if isinstance(original, torch.nn.Parameter):
        holder.register_parameter(leaf, torch.nn.Parameter(mean, requires_grad=original.requires_grad))
    else:
        holder.register_buffer(leaf, mean)
    return target


def already_shared(graph: Graph, stack: BlockStack, members: list[Block]) -> bool:
    """Whether every member already reads the first member's non-norm tensors."""
    reads = [{k: {str(a.target) for a in v} for k, v in _shared_attrs(graph, m, stack).items()} for m in members]
    return all(r == reads[0] and all(len(t) == 1 for t in r.values()) for r in reads)


def share_group(graph: Graph, stack: BlockStack, members: list[Block], policy: str) -> int:
    """Point every member's non-norm get_attr nodes at one tensor per weight; returns nodes retargeted."""
    owner_attrs = _shared_attrs(graph, members[0], stack)
    member_attrs = [_shared_attrs(graph, m, stack) for m in members]
    for block, attrs in zip(members[1:], member_attrs[1:]):
        if set(attrs) != set(owner_attrs):
            raise PreconditionError(f"blocks {members[0].path} and {block.path} read different weights; "
                                    "they cannot share", ShareWeights.name)
    retargeted = 0
    for relative in owner_attrs:
        shapes = {tuple(graph.attribute(str(a.target)).shape) for attrs in member_attrs for a in attrs[relative]}
        if len(shapes) != 1:
            raise PreconditionError(f"{relative} has shapes {sorted(shapes)} across the group starting at "
                                    f"{members[0].path}, so one tensor cannot serve them all (did a width pass "
                                    "prune blocks differently?)", ShareWeights.name)
        sources = [str(attrs[relative][0].target) for attrs in member_attrs]
        target = _group_tensor(graph, members[0], sources, relative, policy)
        for attrs in member_attrs:
            for node in attrs[relative]:
                if str(node.target) != target:
                    node.target = target
                    retargeted += 1
    return retargeted


@register_pass
@dataclass(frozen=True)
class ShareWeights(Pass):
    """blocks g*k+1 .. g*k+g-1 read block g*k's weights (norms stay per block); unread copies are deleted."""

    name: ClassVar[str] = "share-weights"
    preserves_semantics: ClassVar[bool] = False
    group: int = 2  # consecutive blocks per shared set of weights
    policy: Literal["first", "mean"] = "first"

    def __post_init__(self) -> None:
        if self.group < 1:
            raise self.bad_option(f"group must be >= 1, got {self.group}")

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        planned = [n for n in graph.fx.nodes if n.target in MST_OPS]
        if planned:
            raise PreconditionError(f"{planned[0].format_node()} holds an xnor-mst reuse plan computed from its "
                                    "own weights, so blocks cannot share them; run share-weights before xnor-mst",
                                    self.name)
        quantized = [n for n in graph.fx.nodes if n.target in QUANTIZED_OPS]
        if quantized and self.policy == "mean":
            raise PreconditionError(f"{quantized[0].format_node()} reads packed codes, which cannot be averaged; "
                                    "use policy=first, or run share-weights before quantize", self.name)

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        stack = ctx.analyses.get(graph, MainBlockStack)
        groups = [] if stack is None else [list(stack.blocks[i:i + self.group])
                                           for i in range(0, len(stack), self.group)]
        groups = [g for g in groups if len(g) > 1 and not already_shared(graph, stack, g)]
        if not groups:
            reason = no_blocks_reason(graph) if stack is None else \
                f"every group of {self.group} blocks already reads one set of weights"
            return PassResult(graph, modified=False, stats={"groups": [], "reason": reason})
        new = graph.copy()
        before_unique, before_executed = graph.num_params, executed_params(graph)
        retargeted = sum(share_group(new, stack, members, self.policy) for members in groups)
        new.remove_unused_attributes()
        new.recompile()
        return PassResult(new, modified=True, stats={
            "groups": [[b.path for b in members] for members in groups], "retargeted_reads": retargeted,
            "unique_params_before": before_unique, "unique_params": new.num_params,
            "executed_params_before": before_executed, "executed_params": executed_params(new),
            "bytes_before": graph.param_bytes, "bytes_after": new.param_bytes})  # packed buffers count here
