"""quantize: linear(x, W, b) -> quantized_linear(x, codes, scales, zeros, b), W in `bits`-bit groups along K.

Every linear as captured (`aten.linear`, `addmm` / `mm` reading a weight attribute) whose module path
matches `targets` (globs; default all) and none of `skip` is replaced by `fxpress::quantized_linear`
holding the packed layout of `fxpress.ops.quant`; with `embed=true` embeddings become
`fxpress::quantized_embedding`; the head (the linear the output is reached from) only with `head=true`.
A head tied to the embedding (one tensor) is quantized once, for both, with `embed=true,head=true`;
asking for only one of them is refused.

- ``method=rtn``: round to nearest per group.
- ``method=gptq``: GPTQ (`gptq.py`) with H = 2 X^T X / n + damp * mean(diag H) I from the layer's inputs
  recorded on `ctx.calibration` (a mixed set of domains keeps it from over-fitting one); embedding
  tables have no inputs to weigh and are rounded to nearest.
- ``scheme=asym`` with ``zero=float`` (default; GGUF Q4_1's offset) or ``zero=int`` (integer zero
  points, GPTQ's form); ``scheme=sym`` has no zero point.
- A K that `group` does not divide is an error naming the layer unless ``pad=true`` (zero columns).

Stats per layer and in total: bits per weight including scales and zeros, weight relative error,
the output-error proxy ||(W - W_hat) X|| / ||W X|| on the calibration inputs (when there are any),
Shannon entropy and Huffman length of the codes per weight, bytes before and after.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from torch.fx import Node

from fxpress.analysis.recorder import ValueRecorder
from fxpress.errors import PreconditionError
from fxpress.ir.builder import Builder
from fxpress.ir.graph import Graph
from fxpress.ir.opinfo import op_info, op_label, op_qualname
from fxpress.ir.rewrite import add_tensor, erase_dead, erase_unused_get_attrs
from fxpress.ops.quant import (BITS, QUANTIZED_EMBEDDING, QUANTIZED_LINEAR, QUANTIZED_OPS, QuantizedWeight,
                               quant_form, quantize_weight)
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass
from fxpress.passes.quant import code_stats
from fxpress.passes.quant.gptq import gptq_quantize
from fxpress.passes.quant.layers import WeightUse, head_nodes, operands, weight_uses
from fxpress.passes.sparsity.obs_math import HessianSums, layer_hessian


@dataclass
class Layer:
    """One tensor to quantize and every chosen node reading it (a tied tensor has several)."""

    path: str
    transposed: bool
    uses: list[WeightUse]

    @property
    def name(self) -> str:
        return self.uses[0].module or self.path

    @property
    def linear_inputs(self) -> list[str]:
        return [use.x for use in self.uses if use.kind == "linear"]


def layer_weight(graph: Graph, layer: Layer) -> torch.Tensor:
    """The layer's float32 (N, K) weight (the transpose of an attribute stored (K, N))."""
    weight = graph.attribute(layer.path).detach().float()
    return weight.t() if layer.transposed else weight


PackLayer = Callable[[Layer, torch.Tensor, "HessianSums | None"], tuple[QuantizedWeight, str]]


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """linear(x, W, b) -> quantized_linear(x, codes, scales, zeros, b): W rounded (RTN or GPTQ) to bits-bit groups."""

    name: ClassVar[str] = "quantize"
    creates: ClassVar[tuple] = QUANTIZED_OPS
    preserves_semantics: ClassVar[bool] = False
    bits: int = 4  # 2, 3, 4 or 8
    group: int = 32  # consecutive values along K sharing a scale (and zero)
    scheme: Literal["asym", "sym"] = "asym"
    zero: Literal["float", "int"] | None = None  # asym: float offset (default) or integer zero point
    method: Literal["rtn", "gptq"] = "rtn"
    targets: tuple[str, ...] = ()  # globs of module paths to quantize; default every linear
    skip: tuple[str, ...] = ()  # globs of module paths to leave in float
    embed: bool = False  # quantize embedding tables too
    head: bool = False  # quantize the head (the linear producing the output)
    pad: bool = False  # pad K with zero columns to a multiple of group instead of refusing
    damp: float = 0.01  # GPTQ damping, relative to the mean diagonal of H

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise self.bad_option(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group < 1:
            raise self.bad_option(f"group must be >= 1, got {self.group}")
        if not self.damp > 0:
            raise self.bad_option(f"damp must be > 0, got {self.damp}")
        try:
            quant_form(self.scheme, self.zero)
        except ValueError as err:
            raise self.bad_option(str(err)) from None

    @property
    def form(self) -> str:
        return quant_form(self.scheme, self.zero)

    # -- what to quantize ---------------------------------------------------------------
    def plan(self, graph: Graph) -> tuple[list[Layer], list[WeightUse]]:
        """The layers to quantize, and the float uses left out (by head, embed, targets or skip)."""
        uses = weight_uses(graph)
        heads = head_nodes(graph, uses)
        chosen, left = [], []
        for use in uses:
            wanted = (self.embed if use.kind == "embedding" else self.head if use.node in heads else True)
            matches = (not self.targets or any(fnmatch.fnmatchcase(use.module, g) for g in self.targets)) and \
                not any(fnmatch.fnmatchcase(use.module, g) for g in self.skip)
            (chosen if wanted and matches else left).append(use)
        self._check_ties(graph, chosen, left, heads)
        layers: dict[tuple[int, bool], Layer] = {}
        for use in chosen:
            key = (id(graph.attribute(use.path)), use.transposed)
            layers.setdefault(key, Layer(use.path, use.transposed, [])).uses.append(use)
        return list(layers.values()), left

    def _check_ties(self, graph: Graph, chosen: list[WeightUse], left: list[WeightUse], heads: set[str]) -> None:
        """A tensor both the embedding and the head read is quantized for both or for neither."""
        kept = {id(graph.attribute(use.path)): use for use in left if use.kind == "embedding" or use.node in heads}
        for use in chosen:
            other = kept.get(id(graph.attribute(use.path)))
            if other is not None and other.kind != use.kind:
                embedding, head = (use, other) if use.kind == "embedding" else (other, use)
                raise PreconditionError(
                    f"the head {head.module} and the embedding {embedding.module} read one tied tensor "
                    f"({use.path}); quantizing only one would keep a float and a quantized copy. Set "
                    "embed=true,head=true to quantize it once for both, or leave both float", self.name)

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if self.method == "gptq":
            ctx.require_calibration(self.name)
        layers, _ = self.plan(graph)
        if self.targets and not layers:
            paths = sorted({use.module for use in weight_uses(graph)})
            raise PreconditionError(f"targets={';'.join(self.targets)} matches no float linear"
                                    f"{' or embedding' if self.embed else ''}; module paths here: "
                                    f"{', '.join(paths[:8]) or 'none'}{' ...' if len(paths) > 8 else ''}", self.name)
        for layer in layers:
            features = graph.attribute(layer.path).shape[0 if layer.transposed else 1]
            if features % self.group and not self.pad:
                node = next(n for n in graph.fx.nodes if n.name == layer.uses[0].node)
                raise PreconditionError(
                    f"layer {layer.name} ({node.format_node()}) has K = {features} input features, not a multiple "
                    f"of group={self.group}; set pad=true, a group dividing {features}, or skip={layer.name}",
                    self.name)
        if not layers:
            self._refuse_other_ops(graph)

    def _refuse_other_ops(self, graph: Graph) -> None:
        """No float linear in scope because another pass turned them into its own ops: say which."""
        others = [n for n in graph.fx.nodes if n.op == "call_function" and n.target not in QUANTIZED_OPS
                  and op_qualname(n.target).startswith("fxpress::")
                  and getattr(op_info(n.target), "category", None) in ("matmul", "binary")]
        if others:
            raise PreconditionError(f"no float linear left to quantize: {len(others)} layers are "
                                    f"{op_label(others[0].target)} ({others[0].format_node()}), which quantize "
                                    "cannot repack; run quantize before the pass that made them", self.name)

    # -- the pass -----------------------------------------------------------------------
    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        return self.rewrite(graph, ctx)

    def rewrite(self, graph: Graph, ctx: PassContext, pack: PackLayer | None = None) -> PassResult:
        """The pass, with `pack(layer, weight, hessian) -> (QuantizedWeight, method)` choosing each layer's
        packed weight instead of RTN / GPTQ (quantized-distill and diff-quant hand theirs in here)."""
        self.requires(graph, ctx)  # also when called outside a PassManager
        pack = pack or (lambda layer, weight, hessian: self.quantize_layer(weight, hessian))
        layers, left = self.plan(graph)
        if not layers:
            done = sum(1 for n in graph.fx.nodes if n.target in QUANTIZED_OPS)
            reason = f"every linear in scope is already quantized ({done} quantized ops)" if done else \
                "no float linear or embedding weight attribute in scope"
            kept = [use.module for use in left]
            return PassResult(graph, modified=False, stats={"quantized": 0, "kept_float": kept, "reason": reason})
        started = time.perf_counter()
        xtx = self.input_statistics(graph, layers, ctx) if ctx.calibration else {}
        new = graph.copy()
        build, per_layer = Builder(new, self.name), {}
        for layer in ctx.progress.track(layers, "quantize: layers", total=len(layers)):
            weight = layer_weight(graph, layer)
            hessian = self.layer_xtx(layer, xtx)
            packed, method = pack(layer, weight, hessian)
            self._rewrite(new, build, layer, packed)
            per_layer[layer.name] = self._layer_stats(weight, packed, hessian, method)
        erase_unused_get_attrs(new)
        for path in new.remove_unused_attributes():
            new.masks.pop(path, None)
        new.recompile()
        stats = self._totals(per_layer, graph, new)
        stats.update(kept_float=[use.module for use in left], per_layer=per_layer,
                     seconds=round(time.perf_counter() - started, 2))
        return PassResult(new, modified=True, stats=stats)

    def quantize_layer(self, weight: torch.Tensor, hessian: HessianSums | None) -> tuple[QuantizedWeight, str]:
        """RTN, or GPTQ with `method=gptq` where the layer has input statistics."""
        if self.method == "gptq" and hessian is not None:
            h = layer_hessian(hessian.xtx, hessian.rows, self.damp)
            return gptq_quantize(weight, h, self.bits, self.group, self.form, self.pad), "gptq"
        return quantize_weight(weight, self.bits, self.group, self.scheme, self.zero, self.pad), "rtn"

    def input_statistics(self, graph: Graph, layers: list[Layer], ctx: PassContext) -> dict[str, HessianSums]:
        """X^T X of every chosen linear's input, on the calibration batches."""
        sums: dict[str, HessianSums] = {}

        def observe(node: Node, value: Any) -> None:
            sums.setdefault(node.name, HessianSums(value.shape[-1])).add(value)

        recorder = ValueRecorder(graph, sorted({name for layer in layers for name in layer.linear_inputs}))
        recorder.add_observer(observe)
        for batch in ctx.progress.track(ctx.calibration, "quantize: layer inputs", total=len(ctx.calibration)):
            recorder.run_batch(batch)
        return sums

    @staticmethod
    def layer_xtx(layer: Layer, xtx: dict[str, HessianSums]) -> HessianSums | None:
        """The summed input statistics of a layer's linears (None: an embedding, or no calibration)."""
        if not xtx or not layer.linear_inputs or any(use.kind == "embedding" for use in layer.uses):
            return None
        total = HessianSums(xtx[layer.linear_inputs[0]].xtx.shape[0])
        for name in dict.fromkeys(layer.linear_inputs):
            total.xtx += xtx[name].xtx
            total.rows += xtx[name].rows
        return total

    def _rewrite(self, graph: Graph, build: Builder, layer: Layer, packed: QuantizedWeight) -> None:
        """Register the packed tensors once and point every use of the layer at them."""
        owner, _, leaf = layer.path.rpartition(".")
        paths = {name: add_tensor(graph, owner, f"{leaf}_{name}", tensor) for name, tensor in packed.tensors.items()}
        nodes = {node.name: node for node in graph.fx.nodes}
        for use in layer.uses:
            node = nodes[use.node]
            with build.before(node) as at:
                codes, scales, zeros, codebook = (at.get_attr(paths[n]) if n in paths else None
                                                  for n in ("codes", "scales", "zeros", "codebook"))
                if use.kind == "embedding":
                    new = at.call(QUANTIZED_EMBEDDING, node.args[1], codes, scales, zeros, codebook, packed.bits,
                                  packed.group, packed.in_features, name="quantized_embedding")
                else:
                    x, bias = operands(node)
                    new = at.call(QUANTIZED_LINEAR, x, codes, scales, zeros, codebook, bias,
                                  packed.bits, packed.group, name="quantized_linear")
            node.replace_all_uses_with(new)
            weight_arg = nodes[use.weight_arg.name]
            graph.fx.erase_node(node)
            erase_dead(graph, [weight_arg])

    def _layer_stats(self, weight: torch.Tensor, packed: QuantizedWeight, hessian: HessianSums | None,
                     method: str) -> dict[str, Any]:
        approx = packed.dequantize()
        counts = code_stats.code_histogram(packed.unpacked_codes()[:, :packed.in_features], packed.bits)
        stats: dict[str, Any] = {
            "shape": list(weight.shape), "method": method, "bits_per_weight": round(packed.bits_per_weight, 4),
            "weight_error": round(code_stats.relative_error(weight, approx), 6),
            "entropy_bits": round(code_stats.entropy_bits(counts), 4),
            "huffman_bits": round(code_stats.huffman_bits(counts), 4),
            "bytes_before": weight.numel() * 4, "bytes_after": packed.nbytes}
        if hessian is not None:
            stats["output_error"] = round(code_stats.output_error(weight, approx, hessian.xtx), 6)
        return stats

    def _totals(self, per_layer: dict[str, dict], before: Graph, after: Graph) -> dict[str, Any]:
        weights = {name: s["shape"][0] * s["shape"][1] for name, s in per_layer.items()}
        total = sum(weights.values())

        def mean(key: str) -> float | None:
            present = [name for name in per_layer if key in per_layer[name]]
            if not present:
                return None
            return round(sum(per_layer[n][key] * weights[n] for n in present) / sum(weights[n] for n in present), 6)

        packed = sum(s["bytes_after"] for s in per_layer.values())
        return {"quantized": len(per_layer), "bits": self.bits, "group": self.group, "form": self.form,
                "method": self.method, "weights": total, "bits_per_weight": round(8 * packed / total, 4),
                "entropy_bits": mean("entropy_bits"), "huffman_bits": mean("huffman_bits"),
                "weight_error": mean("weight_error"), "output_error": mean("output_error"),
                "weight_bytes_before": sum(s["bytes_before"] for s in per_layer.values()),
                "weight_bytes_after": packed, "bytes_before": before.param_bytes, "bytes_after": after.param_bytes}
