"""The `sparse-kernels` pass: sparse weights run on fxpress::sparse_linear where that beats dense."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch.fx import Node

from fxpress.ir.builder import Builder
from fxpress.ir.graph import Graph
from fxpress.ir.rewrite import add_tensor, erase_unused_get_attrs
from fxpress.ops.sparse import SPARSE_LINEAR, CompressedWeight, block_mask, compress_weight
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass

aten = torch.ops.aten
BLOCK_ROWS = {"block": 4, "csr": 1}

# Speedup of the sparse_linear C kernel over dense F.linear (MKL) at 1 thread, by weight sparsity
# (for `block`: the fraction of 4x1 blocks that are all zero): the minimum over the MiniLM
# (384<->1536, 384<->384) and SmolLM2 (576<->1536) linear shapes at 28 and 128 tokens, best of 100
# calls each, on a 2-core AVX2 CPU.  Break-even: about 30% for 4x1 blocks, 67% for CSR.
SPEEDUP_TABLE: dict[str, tuple[tuple[float, float], ...]] = {
    "block": ((0.0, 0.9), (0.25, 0.94), (0.5, 1.36), (0.75, 1.87), (0.9, 4.0), (0.95, 4.0), (0.98, 5.24)),
    "csr": ((0.0, 0.42), (0.25, 0.49), (0.5, 0.55), (0.75, 1.21), (0.9, 2.41), (0.95, 3.34), (0.98, 4.51)),
}


def table_speedup(form: str, sparsity: float) -> float:
    """The tabled speedup at `sparsity`, linear between points, the last value past the last point."""
    points = SPEEDUP_TABLE[form]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if sparsity <= s1:
            return v0 + (v1 - v0) * (max(sparsity, s0) - s0) / (s1 - s0)
    return points[-1][1]


def timed_speedup(weight: torch.Tensor, bias: torch.Tensor | None, packed: CompressedWeight, tokens: int,
                  repeats: int = 20) -> float:
    """Dense time / sparse time for this layer on `tokens` random rows, thread CPU time, interleaved."""
    x = torch.randn(tokens, weight.shape[1], generator=torch.Generator().manual_seed(0))
    args = (x, packed.values, packed.col_index, packed.row_ptr, bias, packed.out_features)
    runs = {"dense": lambda: F.linear(x, weight, bias), "sparse": lambda: SPARSE_LINEAR(*args)}
    best = {name: float("inf") for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                start = time.thread_time()
                fn()
                best[name] = min(best[name], time.thread_time() - start)
    return best["dense"] / max(best["sparse"], 1e-9)


def sparse_linears(graph: Graph) -> list[Node]:
    """aten.linear nodes whose weight is a float32 2-D attribute of the graph."""
    found = []
    for node in graph.fx.nodes:
        if node.target != aten.linear.default or not isinstance(node.args[1], Node):
            continue
        weight = node.args[1]
        if weight.op == "get_attr" and graph.info(weight).dtype == "f32" and len(graph.info(weight).shape) == 2:
            found.append(node)
    return found


@register_pass
@dataclass(frozen=True)
class SparseKernels(Pass):
    """linear(x, W, b) -> sparse_linear(x, compressed W, b) for weights sparse enough to run faster."""

    name: ClassVar[str] = "sparse-kernels"
    creates: ClassVar[tuple] = (SPARSE_LINEAR,)
    form: Literal["auto", "block", "csr"] = "auto"  # auto: whichever is predicted faster
    min_speedup: float = 1.0  # replace a layer only where sparse is predicted this much faster
    measure: Literal["table", "time"] = "table"  # SPEEDUP_TABLE, or time this layer's shape here

    def __post_init__(self):
        if self.form not in ("auto", "block", "csr"):
            raise self.bad_option(f"form must be auto, block or csr, got {self.form!r}")
        if self.measure not in ("table", "time"):
            raise self.bad_option(f"measure must be table or time, got {self.measure!r}")
        if not self.min_speedup > 0:
            raise self.bad_option(f"min_speedup must be > 0, got {self.min_speedup}")

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        plans = [self._plan(graph, node) for node in sparse_linears(graph)]
        chosen = [plan for plan in plans if plan["chosen"]]
        stats: dict[str, Any] = {"layers": [_public(plan) for plan in plans]}
        if not chosen:
            why = "no linear layer with a float32 weight attribute" if not plans else \
                f"no linear layer is predicted >= {self.min_speedup}x faster sparse ({self.measure})"
            return PassResult(graph, modified=False, stats=stats | {"replaced": 0, "reason": why})
        new = graph.copy()
        nodes = {node.name: node for node in new.fx.nodes}
        build = Builder(new, self.name)
        for plan in chosen:
            self._replace(new, build, nodes[plan["node"]], plan["packed"])
        erase_unused_get_attrs(new)
        removed = new.remove_unused_attributes()
        for path in removed:
            new.masks.pop(path, None)
        new.recompile()
        return PassResult(new, modified=True, stats=stats | {
            "replaced": len(chosen), "bytes_before": graph.param_bytes, "bytes_after": new.param_bytes})

    def _plan(self, graph: Graph, node: Node) -> dict[str, Any]:
        """What to do with one linear: its sparsity per form, the chosen form and predicted speedup."""
        weight = graph.attribute(str(node.args[1].target)).detach()
        sparsity = {"block": 1.0 - float(block_mask(weight, 4).float().mean()),
                    "csr": 1.0 - float(weight.ne(0).float().mean())}
        forms = ("block", "csr") if self.form == "auto" else (self.form,)
        bias_node = node.args[2] if len(node.args) > 2 else None
        speedups = {}
        for form in forms:
            if self.measure == "table":
                speedups[form] = table_speedup(form, sparsity[form])
            else:
                bias = None if bias_node is None else graph.attribute(str(bias_node.target)).detach() \
                    if isinstance(bias_node, Node) and bias_node.op == "get_attr" else None
                tokens = max(1, math.prod(graph.info(node.args[0]).shape) // max(1, weight.shape[1]))
                speedups[form] = timed_speedup(weight, bias, compress_weight(weight, BLOCK_ROWS[form]), tokens)
        form = max(speedups, key=speedups.get)
        plan = {"node": node.name, "layer": graph.info(node).module_path, "form": form,
                "sparsity": round(sparsity[form], 4), "speedup": round(speedups[form], 2),
                "chosen": speedups[form] >= self.min_speedup}
        if plan["chosen"]:
            plan["packed"] = compress_weight(weight, BLOCK_ROWS[form])
            plan["density"] = round(plan["packed"].density, 4)
        else:
            plan["reason"] = f"predicted {speedups[form]:.2f}x < min_speedup {self.min_speedup}"
        return plan

    def _replace(self, graph: Graph, build: Builder, linear: Node, packed: CompressedWeight) -> None:
        x, weight, bias = (list(linear.args) + [None])[:3]
        owner = str(weight.target).rpartition(".")[0]
        values = add_tensor(graph, owner, "weight_values", packed.values, parameter=True)
        col_index = add_tensor(graph, owner, "weight_col_index", packed.col_index)
        row_ptr = add_tensor(graph, owner, "weight_row_ptr", packed.row_ptr)
        with build.before(linear) as at:
            sparse = at.call(SPARSE_LINEAR, x, at.get_attr(values), at.get_attr(col_index), at.get_attr(row_ptr),
                             bias, packed.out_features)
        linear.replace_all_uses_with(sparse)
        graph.fx.erase_node(linear)


def _public(plan: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in plan.items() if key not in ("packed", "node")}
