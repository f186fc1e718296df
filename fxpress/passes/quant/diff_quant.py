"""diff-quant: linear(x, W, b) -> quantized_linear(x, codes, scales, zeros, codebook, b), codebook learned by SGD.

Differentiable quantization (Polino et al., ICLR 2018).  Each chosen linear (as `quantize` picks them)
keeps its group scales and shifts (the RTN parameters of `scheme` / `zero`), so W_i = scale_i * u_i +
shift_i with u_i in [0, 2^bits - 1] (the scaled domain).  A per-tensor codebook p of 2^bits points in
that domain replaces the uniform grid: Q_i = scale_i * p[a_i] + shift_i with a_i the point nearest u_i
(at the start; see `reassign`).
With the weights frozen, the points are learned by Adam (cosine-decayed) against the teacher's outputs (the input graph,
or ctx.teacher with ``teacher=context``): T^2 * KL(teacher || student at temperature T) on the
calibration batches, plus (1 - alpha) task loss where labels exist (as quantized-distill).  Autograd
gives dL/dp_j = sum over weights assigned to j of scale_i * dL/dQ_i, the paper's gradient.  That gradient
holds the assignments fixed, and by default (``reassign=0``) so does training: each weight keeps the point
nearest it at the start.  ``reassign=N`` moves every weight to its nearest point every N steps (the paper's
nearest-point Q); when a step moves points apart, the weights at the cell borders then jump to the inner
point, a change the gradient did not see.  At the end every weight moves to its nearest point unless that
raises the calibration KL over the assignment the points were trained for (stat ``final_assignment``).

- ``init=quantiles``: p_j = the (j + 1/2) / 2^bits quantile of the tensor's u; ``init=uniform``: p_j = j
  (the RTN grid: step 0 is the RTN graph).
- The output is `quantize`'s packed `fxpress::quantized_linear` plus the codebook (stored signed,
  p - 2^(bits-1), for ``scheme=sym``), through the quantize pass's rewrite, with its stats.
- ``bit_alloc=true`` (bits per layer by gradient norm) is not implemented and is refused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.func import functional_call

from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph
from fxpress.ops.quant import QUANTIZED_OPS, QuantizedWeight, group_params, pack_weight, quant_form
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass
from fxpress.passes.infra.losses import cosine_decay
from fxpress.passes.quant.grid import grouped
from fxpress.passes.quant.quantize import Layer, Quantize, layer_weight
from fxpress.passes.quant.quantized_distill import (check_quant_options, code_domain,
                                                    distillation_loss, output_tensor, refuse_quantized,
                                                    resolve_teacher, softened_kl, task_loss_kind, teacher_outputs)

QUANTILE_SAMPLE = 1 << 22  # values a quantile initialisation looks at (every k-th of a larger tensor)


class CodebookLayer:
    """One weight in the scaled domain: u, scale and shift per value (padded to whole groups), a codebook."""

    def __init__(self, weight: Tensor, bits: int, group: int, form: str, init: str):
        self.rows, self.features = weight.shape
        self.bits, self.group, self.form = bits, group, form
        w, self.padded = grouped(weight, group)
        scale, self.zero = group_params(w, bits, form)
        self.scale = scale
        self.u, self.shift = code_domain(w, scale.unsqueeze(-1), None if self.zero is None else self.zero.unsqueeze(-1),
                                         bits, form)
        levels = 2 ** bits
        if init == "quantiles":
            values = self._real_u()
            values = values[:: max(1, values.numel() // QUANTILE_SAMPLE)].double()  # torch.quantile's size limit
            start = torch.quantile(values, (torch.arange(levels, dtype=torch.float64) + 0.5) / levels).float()
        else:
            start = torch.arange(levels, dtype=torch.float32)
        self.codebook = torch.nn.Parameter(start, requires_grad=True)
        self.assign()

    def _real_u(self) -> Tensor:
        return self.u.reshape(self.rows, self.padded)[:, : self.features].reshape(-1)

    def assign(self) -> None:
        """Each value's nearest codebook point."""
        with torch.no_grad():
            self.codes = (self.u.unsqueeze(-1) - self.codebook.detach()).abs().argmin(-1)

    def weight(self) -> Tensor:
        """Q(W) (N, K), differentiable in the codebook."""
        values = self.scale.unsqueeze(-1) * self.codebook[self.codes] + self.shift
        return values.reshape(self.rows, self.padded)[:, : self.features]

    def packed(self) -> QuantizedWeight:
        stored = self.codebook.detach().clone()
        if self.form == "sym":
            stored = stored - 2 ** (self.bits - 1)
        return pack_weight(self.codes.reshape(self.rows, self.padded), self.scale, self.zero, self.bits, self.group,
                           self.features, self.form, stored)


@register_pass
@dataclass(frozen=True)
class DiffQuant(Pass):
    """linear(x, W, b) -> quantized_linear(x, codes, scales, zeros, codebook, b): levels learned to fit the teacher."""

    name: ClassVar[str] = "diff-quant"
    creates: ClassVar[tuple] = QUANTIZED_OPS
    preserves_semantics: ClassVar[bool] = False
    bits: int = 2  # 2, 3, 4 or 8
    group: int = 32  # the paper's bucket (it used 256)
    scheme: Literal["asym", "sym"] = "asym"
    zero: Literal["float", "int"] | None = None
    init: Literal["quantiles", "uniform"] = "quantiles"
    steps: int = 50
    lr: float = 0.01  # in code units (the uniform grid's spacing is 1)
    reassign: int = 0  # move every weight to its nearest point every `reassign` steps; 0: never while training
    T: float = 2.0
    alpha: float = 0.7
    bit_alloc: bool = False  # not implemented: refused
    teacher: Literal["input", "context"] = "input"
    targets: tuple[str, ...] = ()  # as quantize
    skip: tuple[str, ...] = ()
    head: bool = False
    pad: bool = False

    def __post_init__(self) -> None:
        check_quant_options(self, self.bits, self.group, self.scheme, self.zero)
        if self.steps < 0 or self.reassign < 0 or not self.lr > 0 or not self.T > 0 or not 0 <= self.alpha <= 1:
            raise self.bad_option(f"steps must be >= 0, reassign >= 0, lr and T > 0, alpha in [0, 1]; got steps="
                                  f"{self.steps}, reassign={self.reassign}, lr={self.lr}, T={self.T}, "
                                  f"alpha={self.alpha}")
        if self.bit_alloc:
            raise self.bad_option("bit_alloc=true (bits per layer by gradient norm) is not implemented; use "
                                  "bit_alloc=false and one `bits` for every layer")

    @property
    def form(self) -> str:
        return quant_form(self.scheme, self.zero)

    def quantizer(self) -> Quantize:
        return Quantize(bits=self.bits, group=self.group, scheme=self.scheme, zero=self.zero, targets=self.targets,
                        skip=self.skip, head=self.head, pad=self.pad)

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        ctx.require_calibration(self.name)
        resolve_teacher(graph, ctx, self.teacher, self.name)
        refuse_quantized(graph, self.name)
        try:
            self.quantizer().requires(graph, ctx)
        except PreconditionError as err:
            raise PreconditionError(err.detail, self.name) from None
        if not self.quantizer().plan(graph)[0]:
            raise PreconditionError("no float linear to quantize (the head stays float unless head=true)", self.name)

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.requires(graph, ctx)
        started = time.perf_counter()
        batches = ctx.require_calibration(self.name)
        quantizer = self.quantizer()
        layers, _ = quantizer.plan(graph)
        targets = teacher_outputs(resolve_teacher(graph, ctx, self.teacher, self.name), batches)
        student = graph.copy()  # the forwards swap tensors in its module, never in the input graph's
        books = {layer.path: CodebookLayer(layer_weight(graph, layer), self.bits, self.group, self.form, self.init)
                 for layer in layers}
        start = {path: book.codebook.detach().clone() for path, book in books.items()}
        kl_before = self._kl(student, layers, books, batches, targets)
        losses = self._train(student, layers, books, batches, targets, ctx)
        kl_after, final = self._final_assignment(student, layers, books, batches, targets)
        result = quantizer.rewrite(graph, ctx, lambda layer, weight, hessian: (books[layer.path].packed(),
                                                                                 "diff-quant"))
        stats = result.stats
        for layer in layers:
            entry = stats["per_layer"][layer.name]
            entry["codebook_start"] = [round(float(v), 4) for v in start[layer.path]]
            entry["codebook"] = [round(float(v), 4) for v in books[layer.path].packed().codebook]
        window = max(1, min(len(batches), self.steps // 4))
        stats.update(method="diff-quant", init=self.init, steps=self.steps, kl_before=round(kl_before, 6),
                     kl_after=round(kl_after, 6), final_assignment=final,
                     task_loss=task_loss_kind(ctx, batches[0], targets[0]) or "none (no labels: T^2 KL only)",
                     seconds=round(time.perf_counter() - started, 2))
        if losses:
            stats.update(loss_first=round(sum(losses[:window]) / window, 6),
                         loss_last=round(sum(losses[-window:]) / window, 6))
        return PassResult(result.graph, modified=True, stats=stats)

    @staticmethod
    def _forward(graph: Graph, layers: list[Layer], books: dict[str, CodebookLayer], batch: tuple) -> Any:
        overrides = {}
        for layer in layers:
            weight = books[layer.path].weight()
            overrides[layer.path] = weight.t() if layer.transposed else weight
        return functional_call(graph.module, overrides, batch)

    def _kl(self, graph: Graph, layers: list[Layer], books: dict, batches: list, targets: list) -> float:
        """Mean KL(teacher || quantized graph) at T = 1 on the calibration batches."""
        with torch.no_grad():
            values = [softened_kl(output_tensor(self._forward(graph, layers, books, batch)), target, 1.0)
                      for batch, target in zip(batches, targets)]
        return float(sum(values) / len(values))

    def _final_assignment(self, graph: Graph, layers: list[Layer], books: dict[str, CodebookLayer], batches: list,
                          targets: list) -> tuple[float, str]:
        """(KL, "nearest" | "trained"): every weight moved to its nearest point, unless that raises the
        calibration KL over the assignment the last steps trained the points for; then that one is kept."""
        trained = {path: book.codes for path, book in books.items()}
        kl_trained = self._kl(graph, layers, books, batches, targets)
        for book in books.values():
            book.assign()
        kl_nearest = self._kl(graph, layers, books, batches, targets)
        if kl_nearest <= kl_trained:
            return kl_nearest, "nearest"
        for path, book in books.items():
            book.codes = trained[path]
        return kl_trained, "trained"

    def _train(self, graph: Graph, layers: list[Layer], books: dict[str, CodebookLayer], batches: list,
               targets: list, ctx: PassContext) -> list[float]:
        optimizer = torch.optim.Adam([book.codebook for book in books.values()], lr=self.lr)
        schedule, losses = cosine_decay(optimizer, self.steps), []
        for step in ctx.progress.track(range(self.steps), self.name, total=self.steps):
            if step and self.reassign and step % self.reassign == 0:
                for book in books.values():
                    book.assign()
            index = step % len(batches)
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                output = self._forward(graph, layers, books, batches[index])
                loss = distillation_loss(output, targets[index], batches[index], ctx, self.T, self.alpha)
                codebooks = [book.codebook for book in books.values()]
                grads = torch.autograd.grad(loss, codebooks, allow_unused=True)  # a layer the output skips: None
                for book, grad in zip(codebooks, grads):
                    book.grad = grad  # only the codebooks: the graph's own tensors get no .grad; Adam skips None
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        return losses
