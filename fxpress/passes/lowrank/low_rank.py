"""low-rank: linear(x, W, b) -> linear(linear(x, V), U, b) and conv2d(x, W) -> conv1x1(conv_kxk(x, V), U), U V ~ W.

Every float linear and groups-1 conv2d whose module path matches `layers` (globs; default all but the
head) is factorized where that cuts its MACs by at least `min_gain`: a linear into two linears through
`rank` features, a k x k conv into a k x k conv to `rank` channels followed by a 1 x 1 conv (same
stride, padding and dilation on the first; the bias on the second).  The result is plain ATen, so
every backend runs it and `distill` trains both factors.

- ``rank=R``: the same rank everywhere; ``energy=E`` (default 0.9 when neither is set): per layer the
  smallest rank keeping E of the squared singular values (for asvd, of ||W X||^2 on the calibration),
  rounded up to a multiple of ``align`` (at most the layer's max rank; default 1: no rounding), so that
  the factors' inner dimension fills whole SIMD vectors (``align=8`` for AVX2 floats: the llvm conv
  schedule zero-pads a rank-11 conv's channels to 16 anyway).  Rounding up only keeps more energy;
  ``min_gain`` is checked on the rounded rank, so a layer it leaves with too little gain stays dense.
- ``method=svd``: truncated SVD of W.  ``method=asvd``: whitened SVD on the calibration inputs
  (`factors.py`), minimizing ||(W - W') X|| instead of ||W - W'||; needs calibration batches.

Stats per layer: rank (of the most it could be), energy_rank (what `energy` asked for, before rounding
to `align`; None with `rank=`), energy kept, MACs and params before and after, and with calibration
the output-error proxy ||(W - W') X|| / ||W X||; in total: what was factorized, what was left and why,
`align`, MACs and params before and after.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch.fx import Node

from fxpress.analysis.recorder import ValueRecorder
from fxpress.errors import PreconditionError
from fxpress.ir.builder import Builder
from fxpress.ir.graph import Graph
from fxpress.ir.opinfo import op_info, op_label, op_qualname
from fxpress.ir.rewrite import add_tensor, erase_dead, erase_unused_get_attrs
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass
from fxpress.passes.lowrank.factors import Spectrum, Whitening, output_error
from fxpress.passes.lowrank.layers import Layer, find_layers, input_rows
from fxpress.passes.sparsity.obs_math import HessianSums

log = logging.getLogger(__name__)
aten = torch.ops.aten
DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class Plan:
    """A layer and the rank chosen for it."""

    layer: Layer
    rank: int
    spectrum: Spectrum
    xtx: HessianSums | None
    energy_rank: int | None = None  # the rank `energy` asked for, before rounding up to `align`


@register_pass
@dataclass(frozen=True)
class LowRank(Pass):
    """linear(x, W, b) -> linear(linear(x, V), U, b) (conv: k x k to rank channels, then 1 x 1) with U V ~ W."""

    name: ClassVar[str] = "low-rank"
    preserves_semantics: ClassVar[bool] = False  # exact only at full rank
    rank: int | None = None  # one rank for every layer
    energy: float | None = None  # per-layer rank keeping this share of sum(s^2); default 0.9 without rank
    method: Literal["svd", "asvd"] = "svd"
    layers: tuple[str, ...] = ()  # globs of module paths; default every linear and conv2d but the head
    min_gain: float = 0.1  # factorize only where MACs drop by at least this share (-1: always)
    head: bool = False  # factorize the head (the linear producing the output) too
    damp: float = 0.01  # asvd: added to the input covariance, relative to its mean diagonal
    align: int = 1  # energy: round each rank up to a multiple of this (at most the max rank); 1: off

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise self.bad_option(f"set rank or energy, not both (got rank={self.rank}, energy={self.energy})")
        if self.rank is not None and self.rank < 1:
            raise self.bad_option(f"rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise self.bad_option(f"energy must be in (0, 1], got {self.energy}")
        if not -1.0 <= self.min_gain < 1.0:
            raise self.bad_option(f"min_gain must be in [-1, 1), got {self.min_gain}")
        if not self.damp > 0:
            raise self.bad_option(f"damp must be > 0, got {self.damp}")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise self.bad_option(f"align must be an integer >= 1 (1: ranks as energy picks them), got {self.align!r}")

    @property
    def target_energy(self) -> float | None:
        return None if self.rank is not None else (self.energy if self.energy is not None else DEFAULT_ENERGY)

    # -- what to factorize --------------------------------------------------------------------
    def scope(self, graph: Graph) -> tuple[list[Layer], dict[str, str]]:
        """The layers `layers` selects, and {module path: why not} for the rest."""
        layers, left = find_layers(graph, head=self.head)
        if not self.layers:
            return layers, left
        chosen = [layer for layer in layers if any(fnmatch.fnmatchcase(layer.name, g) for g in self.layers)]
        left.update({layer.name: f"not matched by layers={';'.join(self.layers)}" for layer in layers
                     if layer not in chosen})
        return chosen, left

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if self.method == "asvd" and not ctx.calibration:
            raise PreconditionError("method=asvd needs calibration batches to weigh the error by the layer "
                                    "inputs; pass calibration batches in the PassContext (or --calibration "
                                    "on the command line), or use method=svd", self.name)
        layers, left = self.scope(graph)
        if not layers and self.layers:
            raise PreconditionError(f"layers={';'.join(self.layers)} matches no linear or conv2d that can be "
                                    f"factorized; module paths here: {_listing(list(left))}", self.name)
        if not layers:
            self._refuse_other_ops(graph)
        if self.rank is not None and layers:
            self._check_rank(graph, layers)

    def _check_rank(self, graph: Graph, layers: list[Layer]) -> None:
        """A rank above min(out, in) is an error for a layer named in `layers`, or when no layer admits it."""
        too_small = [layer for layer in layers if self.rank > layer.max_rank]
        if too_small and len(too_small) == len(layers) and not self.layers:
            self._refuse_other_ops(graph)  # the layers it could take are another pass's ops now: say that
        if too_small and (self.layers or len(too_small) == len(layers)):
            layer = too_small[0]
            node = next(n for n in graph.fx.nodes if n.name == layer.uses[0].node)
            raise PreconditionError(
                f"rank={self.rank} is above min(out, in) = {layer.max_rank} of layer {layer.name} "
                f"({node.format_node()}, weight {tuple(layer.shape)}); set rank <= {layer.max_rank}, use "
                f"energy= for a per-layer rank, or leave {layer.name} out of layers=", self.name)

    def _refuse_other_ops(self, graph: Graph) -> None:
        """No float linear in scope because another pass turned them into its own ops: say which."""
        others = [n for n in graph.fx.nodes if n.op == "call_function" and op_qualname(n.target).startswith("fxpress::")
                  and getattr(op_info(n.target), "category", None) in ("matmul", "binary")]
        if others:
            raise PreconditionError(f"no float linear or conv2d left to factorize: {len(others)} layers are "
                                    f"{op_label(others[0].target)} ({others[0].format_node()}); run low-rank "
                                    "before the pass that made them", self.name)

    # -- the pass -----------------------------------------------------------------------------
    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.requires(graph, ctx)  # also when called outside a PassManager
        layers, left = self.scope(graph)
        sums = self.input_statistics(graph, layers, ctx) if ctx.calibration else {}
        plans = []
        for layer in ctx.progress.track(layers, "low-rank: layers", total=len(layers)):
            plan, reason = self.plan_layer(graph, layer, sums)
            if plan is None:
                left[layer.name] = reason
            else:
                plans.append(plan)
        if not plans:
            reason = "no layer in scope gets at least min_gain fewer MACs" if layers else \
                "no float linear or conv2d in scope"
            return PassResult(graph, modified=False, stats={"factorized": [], "left": left, "reason": reason})
        new = graph.copy()
        build = Builder(new, self.name)
        replaced: dict[str, Node] = {}  # node name -> the node now computing its value
        per_layer = {plan.layer.name: self._rewrite(graph, new, build, plan, replaced) for plan in plans}
        erase_unused_get_attrs(new)
        for path in new.remove_unused_attributes():
            new.masks.pop(path, None)
        new.recompile()
        return PassResult(new, modified=True, stats={
            "factorized": list(per_layer), "method": self.method, "align": self.align, "left": left,
            "macs_before": graph.macs, "macs_after": new.macs,
            "params_before": graph.num_params, "params_after": new.num_params, "per_layer": per_layer})

    def plan_layer(self, graph: Graph, layer: Layer, sums: dict[tuple, HessianSums]) -> tuple[Plan | None, str]:
        """(the layer's rank and spectrum, "") or (None, why it stays dense)."""
        xtx = _layer_xtx(layer, sums)
        if self.method == "asvd" and xtx is None:
            return None, "no calibration batch reached its input"
        whitening = Whitening.from_xtx(xtx.xtx, xtx.rows, self.damp) if self.method == "asvd" else None
        spectrum = Spectrum.of(layer.matrix(graph), whitening)
        energy_rank = None
        if self.rank is not None:
            if self.rank > layer.max_rank:
                return None, f"rank={self.rank} is above min(out, in) = {layer.max_rank}"
            rank = self.rank
        else:
            energy_rank = spectrum.rank_for_energy(self.target_energy)
            rank = aligned_rank(energy_rank, self.align, layer.max_rank)
        gain = 1.0 - layer.cost_ratio(rank)
        if gain < self.min_gain:
            rounded = f" (energy's {energy_rank} rounded up to align={self.align})" if rank != energy_rank else ""
            return None, (f"rank {rank}{rounded} of {layer.max_rank} cuts MACs by {gain:.2f} "
                          f"< min_gain={self.min_gain}")
        return Plan(layer, rank, spectrum, xtx, energy_rank), ""

    def input_statistics(self, graph: Graph, layers: list[Layer], ctx: PassContext) -> dict[tuple, HessianSums]:
        """X^T X of every layer input (im2col patches for convs) on the calibration batches."""
        wanted: dict[str, list[tuple]] = {}
        for layer in layers:
            for key in layer.stat_keys():
                wanted.setdefault(key[0], []).append(key)
        sums: dict[tuple, HessianSums] = {}

        def observe(node: Node, value: Any) -> None:
            for key in dict.fromkeys(wanted[node.name]):
                rows = input_rows(value.detach().float(), key[1], key[2])
                sums.setdefault(key, HessianSums(rows.shape[-1])).add(rows)

        recorder = ValueRecorder(graph, sorted(wanted))
        recorder.add_observer(observe)
        for batch in ctx.progress.track(ctx.calibration, "low-rank: layer inputs", total=len(ctx.calibration)):
            recorder.run_batch(batch)
        return sums

    def _rewrite(self, old: Graph, graph: Graph, build: Builder, plan: Plan,
                 replaced: dict[str, Node]) -> dict[str, Any]:
        """Register U and V once and point every use of the layer at the two factors (`replaced`: what
        the layers rewritten before this one became, by the name of the node each replaced)."""
        layer, rank = plan.layer, plan.rank
        weight = old.attribute(layer.path)
        u, v = plan.spectrum.factors(rank, weight.dtype)
        if layer.kind == "conv2d":
            u, v = u.reshape(layer.out_features, rank, 1, 1), v.reshape(rank, *layer.shape[1:])
        owner, _, leaf = layer.path.rpartition(".")
        u_path = add_tensor(graph, owner, f"{leaf}_u", u, parameter=True)
        v_path = add_tensor(graph, owner, f"{leaf}_v", v, parameter=True)
        nodes = {node.name: node for node in graph.fx.nodes} | replaced
        macs_before = macs_after = 0
        for use in layer.uses:
            node = nodes[use.node]
            macs = old.info(next(n for n in old.fx.nodes if n.name == use.node)).macs or 0
            macs_before, macs_after = macs_before + macs, macs_after + round(macs * layer.cost_ratio(rank))
            x, bias, stem = nodes[use.x], _in(nodes, use.bias), layer.name.replace(".", "_") or "layer"
            with build.before(node) as at:
                if layer.kind == "conv2d":
                    stride, padding, dilation = use.conv
                    inner = at.call(aten.conv2d.default, x, at.get_attr(v_path), None, list(stride), list(padding),
                                    list(dilation), 1, name=f"{stem}_v")
                    outer = at.call(aten.conv2d.default, inner, at.get_attr(u_path), bias, [1, 1], [0, 0], [1, 1], 1,
                                    name=f"{stem}_u")
                else:
                    inner = at.call(aten.linear.default, x, at.get_attr(v_path), name=f"{stem}_v")
                    outer = at.call(aten.linear.default, inner, at.get_attr(u_path), bias, name=f"{stem}_u")
            node.replace_all_uses_with(outer)
            replaced[use.node] = outer
            weight_arg = nodes[use.weight_arg.name]
            graph.fx.erase_node(node)
            erase_dead(graph, [weight_arg])
        return self._layer_stats(old, plan, u, v, macs_before, macs_after)

    def _layer_stats(self, graph: Graph, plan: Plan, u: torch.Tensor, v: torch.Tensor,
                     macs_before: int, macs_after: int) -> dict[str, Any]:
        layer, rank = plan.layer, plan.rank
        stats: dict[str, Any] = {
            "kind": layer.kind, "shape": list(layer.shape), "rank": rank, "max_rank": layer.max_rank,
            "energy_kept": round(plan.spectrum.energy_kept(rank), 6),
            "energy_rank": plan.energy_rank,
            "macs_before": macs_before, "macs_after": macs_after,
            "params_before": layer.out_features * layer.in_features, "params_after": u.numel() + v.numel()}
        if plan.xtx is not None:
            approx = u.reshape(layer.out_features, rank).double() @ v.reshape(rank, -1).double()
            stats["output_error"] = round(output_error(layer.matrix(graph), approx, plan.xtx.xtx), 6)
        log.debug("low-rank %s: rank %d of %d, energy %.4f, MACs %d -> %d", layer.name, rank, layer.max_rank,
                  stats["energy_kept"], macs_before, macs_after)
        return stats


def aligned_rank(rank: int, align: int, max_rank: int) -> int:
    """`rank` rounded up to a multiple of `align`, at most `max_rank`."""
    return min(-(-rank // align) * align, max_rank)


def _in(nodes: dict[str, Node], value: object) -> object:
    """`value` as a node of the copied graph (a bias node), or as it is (None)."""
    return nodes[value.name] if isinstance(value, Node) else value


def _layer_xtx(layer: Layer, sums: dict[tuple, HessianSums]) -> HessianSums | None:
    """The summed input statistics of a layer's uses (None without calibration)."""
    keys = layer.stat_keys()
    if not sums or any(key not in sums for key in keys):
        return None
    total = HessianSums(sums[keys[0]].xtx.shape[0])
    for key in keys:
        total.xtx += sums[key].xtx
        total.rows += sums[key].rows
    return total


def _listing(paths: list[str]) -> str:
    return f"{', '.join(paths[:8]) or 'none'}{' ...' if len(paths) > 8 else ''}"
