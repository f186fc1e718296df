"""quantized-distill: linear(x, W, b) -> quantized_linear(x, pack(Q(W')), b), W' trained through Q to match the teacher.

Quantized distillation (Polino et al., ICLR 2018).  Every linear `quantize` would pick (same `targets`,
`skip`, head rule) keeps a full-precision shadow weight W'; each training step forwards with Q(W') (the
group quantizer of `quantize`: RTN per group, or stochastic rounding with ``rounding=stochastic``),
back-propagates with the straight-through estimator (dL/dW' = dL/dQ(W')) and updates W'.  At the end
W' is handed to `quantize` (its rewrite, round to nearest), so the output is exactly the packed
`fxpress::quantized_linear` form `quantize` produces, with the same stats.

- Teacher: the pass's input graph (``teacher=input``), so `remove-layers{...},quantized-distill{...}`
  distils the shallower float graph into its quantized self; ``teacher=context`` uses ctx.teacher (the
  deeper original: the paper's shallower quantized student of a deeper teacher).
- Loss per calibration batch: alpha * T^2 * KL(teacher || student, both softened by T) on the last
  dimension of the output, plus (1 - alpha) * the task loss where there are labels: ctx.loss when set,
  next-token cross-entropy for causal-LM logits.  Classifier batches carry no labels: the loss is then
  T^2 * KL alone (alpha is not applied).
- Initialisation: W' = W (``init=rtn``: the first forward is the RTN graph) or W' = the GPTQ-dequantized
  W (``init=gptq``, Hessians from ctx.calibration).
- The paper keeps the first and last layers in float: the head (the linear the output is read from)
  and the first linears (reached from the inputs without another matmul, conv or embedding) stay float
  unless ``quantize_first_last=true``.  Other float parameters (biases, norms, float layers) are trained
  too with ``train_float=true``, as in the paper.
- A graph already holding `quantized_linear` ops is refused: its float weights are gone; run
  quantized-distill instead of quantize (``init=gptq`` starts from GPTQ).

- ``grid=learned`` (for 2 and 3 bits): each group's scale and zero start at the clipped range with the least
  error weighted by the layer's input mean squares (`grid.searched_grid`; never worse than RTN's min-max
  grid) and are trained with W' (learned step sizes, `grid.GroupGrid`); the pack stores that grid.
  ``grid=minmax`` (default) re-derives RTN's grid from W' at every step.
- ``blockwise=E``: before the end-to-end steps, every residual block (`find_blocks`) is trained for E
  epochs, one block at a time, to reproduce the input graph's block output from the quantized blocks
  before it (`blockwise.py`; EfficientQAT's Block-AP); the end-to-end steps then train the grid and the
  float parameters, not W'.  ``steps=0`` stops after the blocks.

Sparsity masks a pruning pass left (`Graph.masks`) are re-applied to W' after every step.
Trained tensors are fresh clones: the input graph is never written.  Adam, `steps` steps cycling through
the calibration batches, `batch` batches per step, the learning rate decayed to 0 on a cosine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from fxpress.analysis.blocks import Block, BlockStack, find_blocks, no_blocks_reason
from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph
from fxpress.ops.quant import BITS, QUANTIZED_LINEAR, QUANTIZED_OPS, decode, encode, group_params, quant_form
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.losses import cosine_decay, default_task_loss, looks_like_lm
from fxpress.passes.infra.registry import register_pass
from fxpress.passes.quant import blockwise
from fxpress.passes.quant.grid import GroupGrid, grouped
from fxpress.passes.quant.layers import WeightUse, nearest_linears, weight_uses
from fxpress.passes.quant.quantize import Layer, Quantize, layer_weight

_STOPS = ("matmul", "conv", "binary", "attention", "embedding")  # a path from an input through these is not "first"


# -- the quantizer in the forward ------------------------------------------------------------------
def fake_quantize(weight: Tensor, bits: int, group: int, form: str, rounding: str = "nearest",
                  generator: torch.Generator | None = None) -> Tensor:
    """Q(W): the values `quantize` would store for W (``rounding=nearest``: exactly RTN's dequantized
    weight), or stochastic rounding (each code rounds up with probability equal to its fraction:
    unbiased inside the group's range).  No gradient: use `ste` to train through it."""
    with torch.no_grad():
        rows, features = weight.shape
        w, padded = grouped(weight.float(), group)
        scale, zero = group_params(w, bits, form)
        scale, zero = scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1)
        if rounding == "nearest":
            q = encode(w, scale, zero, bits, form)
        else:
            q = stochastic_codes(w, scale, zero, bits, form, generator)
        return decode(q, scale, zero, bits, form).reshape(rows, padded)[:, :features].to(weight.dtype)


def code_domain(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, form: str) -> tuple[Tensor, Tensor]:
    """(u, shift) with W = scale * u + shift: the unrounded code of each value and its group's shift."""
    if form == "float":
        shift = zero
    elif form == "int":
        shift = -scale * zero
    else:
        shift = -scale * 2 ** (bits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((w - shift) / safe).clamp(0, 2 ** bits - 1), shift.expand_as(w)


def stochastic_codes(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int, form: str,
                     generator: torch.Generator | None) -> Tensor:
    u, _ = code_domain(w, scale, zero, bits, form)
    low = u.floor()
    up = torch.rand(u.shape, generator=generator) < (u - low)
    return (low + up.to(u.dtype)).clamp(0, 2 ** bits - 1)


def ste(weight: Tensor, quantized: Tensor) -> Tensor:
    """Forward: `quantized`; backward: the identity to `weight` (the straight-through estimator)."""
    return quantized.detach() + (weight - weight.detach())  # exactly Q(w) forward: w - w is 0


# -- layers and losses -----------------------------------------------------------------------------
def first_modules(graph: Graph, uses: list[WeightUse]) -> set[str]:
    """Module paths of the linears an input's tensor reaches without passing another matmul, conv or
    embedding (shape values are not followed: see `nearest_linears`)."""
    modules = {use.node: use.module for use in uses if use.kind == "linear"}
    return {modules[name] for name in nearest_linears(graph, uses, from_outputs=False, stops=_STOPS)}


def output_tensor(output: Any) -> Tensor:
    """The logits of an output: the tensor itself, the first of a tuple, `logits` of a dict."""
    if isinstance(output, dict):
        return output["logits"] if "logits" in output else next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def softened_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher || student) of the distributions softmax(logits / T) on the last dimension."""
    classes = teacher.shape[-1]
    log_student = F.log_softmax(student.reshape(-1, classes).float() / temperature, -1)
    log_teacher = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, -1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return temperature ** 2 * kl


def task_loss_kind(ctx: PassContext, batch: tuple, teacher_out: Tensor) -> str | None:
    """Which labelled task loss applies: ctx.loss, next-token cross-entropy, or none (no labels)."""
    if ctx.loss is not None:
        return "ctx.loss"
    return "next-token cross-entropy" if looks_like_lm(batch, teacher_out) else None


def distillation_loss(output: Any, teacher_out: Tensor, batch: tuple, ctx: PassContext, temperature: float,
                      alpha: float) -> Tensor:
    """alpha T^2 KL + (1 - alpha) task loss where labels exist; else T^2 KL."""
    kl = softened_kl(output_tensor(output), teacher_out, temperature)
    kind = task_loss_kind(ctx, batch, teacher_out)
    if kind is None:
        return kl
    task = ctx.task_loss(output, batch) if kind == "ctx.loss" else default_task_loss(output_tensor(output), batch,
                                                                                      teacher_out)
    return alpha * kl + (1 - alpha) * task


def teacher_outputs(teacher: Any, batches: list[tuple]) -> list[Tensor]:
    with torch.no_grad():
        return [output_tensor(teacher(*batch)).detach() for batch in batches]


def check_quant_options(pass_: Pass, bits: int, group: int, scheme: str, zero: str | None) -> None:
    """The option errors `quantize` gives, under the calling pass's name."""
    if bits not in BITS:
        raise pass_.bad_option(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group < 1:
        raise pass_.bad_option(f"group must be >= 1, got {group}")
    try:
        quant_form(scheme, zero)
    except ValueError as err:
        raise pass_.bad_option(str(err)) from None


def refuse_quantized(graph: Graph, pass_name: str) -> None:
    """A graph that already holds quantized linears has lost their float weights: say so."""
    done = [n for n in graph.fx.nodes if n.op == "call_function" and n.target == QUANTIZED_LINEAR]
    if done:
        raise PreconditionError(f"the graph already has {len(done)} quantized linears ({done[0].format_node()}); "
                                f"{pass_name} trains float weights into its own packed form: run it instead of "
                                "quantize, not after it (init=gptq starts from GPTQ)", pass_name)


def resolve_teacher(graph: Graph, ctx: PassContext, choice: str, pass_name: str) -> Any:
    return graph if choice == "input" else ctx.require_teacher(pass_name)


# -- the pass --------------------------------------------------------------------------------------
@register_pass
@dataclass(frozen=True)
class QuantizedDistill(Pass):
    """linear(x, W, b) -> quantized_linear(x, pack(Q(W')), b): W' trained through Q (STE) to match the teacher."""

    name: ClassVar[str] = "quantized-distill"
    creates: ClassVar[tuple] = QUANTIZED_OPS
    preserves_semantics: ClassVar[bool] = False
    bits: int = 4  # 2, 3, 4 or 8
    group: int = 32  # the paper's bucket (it used 256): consecutive values along K sharing a scale (and zero)
    scheme: Literal["asym", "sym"] = "asym"
    zero: Literal["float", "int"] | None = None  # asym: float offset (default, the paper's beta) or integer zero
    rounding: Literal["nearest", "stochastic"] = "nearest"  # of Q in the training forward; the final pack is nearest
    T: float = 2.0  # distillation temperature
    alpha: float = 0.7  # weight of the distillation term when a labelled task loss exists
    steps: int = 100  # end-to-end steps (0 only with blockwise > 0)
    lr: float = 1e-4  # Adam's peak step for W' and float parameters, decayed to 0 on a cosine
    batch: int = 1  # calibration batches per optimizer step (their gradients are summed)
    quantize_first_last: bool = False  # quantize the head and the first linears too
    init: Literal["rtn", "gptq"] = "rtn"  # shadow weights start at W (RTN) or at GPTQ's dequantized W
    train_float: bool = True  # also train the float parameters (biases, norms, float layers)
    teacher: Literal["input", "context"] = "input"  # the input graph, or ctx.teacher
    grid: Literal["minmax", "learned"] = "minmax"  # RTN's grid of W' each step, or searched then trained scales
    grid_lr: float = 1e-3  # Adam's peak step for the scales and zeros of grid=learned
    blockwise: int = 0  # epochs of block-by-block reconstruction before the end-to-end steps (0: none)
    targets: tuple[str, ...] = ()  # as quantize
    skip: tuple[str, ...] = ()
    pad: bool = False

    def __post_init__(self) -> None:
        check_quant_options(self, self.bits, self.group, self.scheme, self.zero)
        if self.steps < 0 or self.batch < 1 or not self.lr > 0 or not self.T > 0 or not 0 <= self.alpha <= 1:
            raise self.bad_option(f"steps must be >= 0, batch >= 1, lr and T > 0, alpha in [0, 1]; got steps="
                                  f"{self.steps}, batch={self.batch}, lr={self.lr}, T={self.T}, alpha={self.alpha}")
        if self.blockwise < 0 or not self.grid_lr > 0:
            raise self.bad_option(f"blockwise must be >= 0 and grid_lr > 0; got blockwise={self.blockwise}, "
                                  f"grid_lr={self.grid_lr}")
        if self.steps == 0 and self.blockwise == 0:
            raise self.bad_option("steps=0 trains nothing: give steps >= 1, or blockwise >= 1 epochs of block-wise "
                                  "reconstruction")
        if self.steps and self.blockwise and self.grid == "minmax" and not self.train_float:
            raise self.bad_option("nothing to train end to end: after blockwise reconstruction the steps train the "
                                  "grid and float parameters, and here the grid is minmax and train_float=false; "
                                  "set steps=0, grid=learned or train_float=true")
        if self.grid == "learned" and self.rounding == "stochastic":
            raise self.bad_option("rounding=stochastic applies to grid=minmax; a learned grid rounds to nearest "
                                  "(its scales are trained through that rounding)")
        if self.blockwise and self.teacher == "context":
            raise self.bad_option("blockwise reconstruction matches each block to the same block of the input "
                                  "graph; with teacher=context (a different graph) use blockwise=0")

    def quantizer(self, graph: Graph) -> Quantize:
        """The `quantize` pass choosing and packing the same layers (first layers skipped unless asked)."""
        base = Quantize(bits=self.bits, group=self.group, scheme=self.scheme, zero=self.zero, method=self.init,
                        targets=self.targets, skip=self.skip, head=self.quantize_first_last, pad=self.pad)
        if self.quantize_first_last:
            return base
        return replace(base, skip=self.skip + tuple(sorted(first_modules(graph, weight_uses(graph)))))

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        ctx.require_calibration(self.name)
        resolve_teacher(graph, ctx, self.teacher, self.name)
        refuse_quantized(graph, self.name)
        quantizer = self.quantizer(graph)
        try:
            quantizer.requires(graph, ctx)
        except PreconditionError as err:
            raise PreconditionError(err.detail, self.name) from None
        if not quantizer.plan(graph)[0]:
            raise PreconditionError("no float linear to quantize (the head and first linears stay float unless "
                                    "quantize_first_last=true)", self.name)
        if self.blockwise:
            self._stack(graph)

    def _stack(self, graph: Graph) -> BlockStack:
        """The residual blocks blockwise reconstruction trains one by one, or a PreconditionError saying why not."""
        stack = find_blocks(graph)
        if stack is None:
            raise PreconditionError(f"blockwise={self.blockwise} needs a stack of repeated residual blocks: "
                                    f"{no_blocks_reason(graph)}; use blockwise=0", self.name)
        carried = next((b for b in stack.blocks if b.carried), None)
        if carried is not None:
            raise PreconditionError(f"block {carried.path} carries state besides its hidden stream (token sizes of "
                                    "merged tokens?), which blockwise reconstruction does not replay; run it before "
                                    "the pass that added that state, or use blockwise=0", self.name)
        return stack

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.requires(graph, ctx)
        started = time.perf_counter()
        batches = ctx.require_calibration(self.name)
        quantizer = self.quantizer(graph)
        layers, _ = quantizer.plan(graph)
        targets = teacher_outputs(resolve_teacher(graph, ctx, self.teacher, self.name), batches)
        student = graph.copy()
        xtx = quantizer.input_statistics(student, layers, ctx) if self.init == "gptq" or self.grid == "learned" \
            else {}
        shadows = self._shadows(student, layers, quantizer, xtx)
        grids = self._grids(student, layers, quantizer, xtx)
        floats = self._float_params(student, layers) if self.train_float else {}
        initial = {layer.path: layer_weight(graph, layer) for layer in layers}
        kl_before = self._kl(student, layers, shadows, grids, batches, targets)
        block_losses = self._blockwise(graph, student, layers, shadows, grids, floats, batches, ctx)
        losses = self._train(student, layers, shadows, grids, floats, batches, targets, ctx)
        kl_after = self._kl(student, layers, shadows, grids, batches, targets)
        for param in [*shadows.values(), *floats.values(), *(p for g in grids.values() for p in g.params)]:
            param.grad = None
            param.requires_grad_(False)
        pack = (lambda layer, weight, hessian: (grids[layer.path].packed(weight), "quantized-distill (learned grid)")) \
            if grids else None
        result = replace(quantizer, method="rtn").rewrite(student, ctx, pack)
        stats = result.stats
        for layer in layers:
            entry = stats["per_layer"][layer.name]
            trained = layer_weight(student, layer)
            entry["weight_change"] = round(float((trained - initial[layer.path]).norm() /
                                                 initial[layer.path].norm().clamp_min(1e-12)), 6)
        stats.update(method=f"quantized-distill ({self.init} init, {self.grid} grid)", steps=self.steps,
                     rounding=self.rounding, grid=self.grid, blockwise=self.blockwise,
                     task_loss=task_loss_kind(ctx, batches[0], targets[0]) or "none (no labels: T^2 KL only)",
                     kl_before=round(kl_before, 6), kl_after=round(kl_after, 6),
                     trained_float_params=sum(p.numel() for p in distinct(floats.values())),
                     seconds=round(time.perf_counter() - started, 2))
        if losses:
            window = max(1, min(len(batches), self.steps // 4))
            stats.update(loss_first=round(sum(losses[:window]) / window, 6),
                         loss_last=round(sum(losses[-window:]) / window, 6))
        if block_losses:
            stats["blocks"] = block_losses
        return PassResult(result.graph, modified=True, stats=stats)

    def _shadows(self, student: Graph, layers: list[Layer], quantizer: Quantize,
                 xtx: dict) -> dict[str, torch.nn.Parameter]:
        """Fresh trainable shadow weights at each layer's path, starting at W or GPTQ's W."""
        shadows = {}
        for layer in layers:
            weight = layer_weight(student, layer)
            if self.init == "gptq":
                weight = quantizer.quantize_layer(weight, quantizer.layer_xtx(layer, xtx))[0].dequantize()
            stored = weight.t() if layer.transposed else weight
            shadows[layer.path] = install(student, layer.path, stored.contiguous())
        return shadows

    def _grids(self, student: Graph, layers: list[Layer], quantizer: Quantize, xtx: dict) -> dict[str, GroupGrid]:
        """grid=learned: each layer's searched grid, weighted by its inputs' mean squares; else none."""
        if self.grid != "learned":
            return {}
        grids = {}
        for layer in layers:
            sums = quantizer.layer_xtx(layer, xtx)
            importance = None if sums is None else sums.xtx.diagonal() / max(1, sums.rows)
            grids[layer.path] = GroupGrid(layer_weight(student, layer), self.bits, self.group, quantizer.form,
                                          importance)
        return grids

    @staticmethod
    def _float_params(student: Graph, layers: list[Layer]) -> dict[str, torch.nn.Parameter]:
        """Fresh trainable clones of the other float parameters, by attribute path (shared tensors: one)."""
        quantized = {id(student.attribute(layer.path)) for layer in layers}
        fresh: set[int] = set()
        for path, tensor in student.referenced_tensors().items():
            if isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point() and id(tensor) not in quantized \
                    and id(tensor) not in fresh:
                fresh.add(id(install(student, path, tensor.detach().clone())))
        return {path: tensor for path, tensor in student.referenced_tensors().items() if id(tensor) in fresh}

    def _quantized(self, layers: list[Layer], shadows: dict, grids: dict[str, GroupGrid], rounding: str,
                   generator: torch.Generator | None) -> dict[str, Tensor]:
        """{attribute path: Q(W')} as the graph stores the weight, differentiable in W' (and the grid)."""
        overrides = {}
        for layer in layers:
            shadow = shadows[layer.path]
            weight = shadow.t() if layer.transposed else shadow
            if layer.path in grids:
                quantized = grids[layer.path].quantize(weight)
            else:
                quantized = ste(weight, fake_quantize(weight, self.bits, self.group,
                                                      quant_form(self.scheme, self.zero), rounding, generator))
            overrides[layer.path] = quantized.t() if layer.transposed else quantized
        return overrides

    def _forward(self, student: Graph, layers: list[Layer], shadows: dict, grids: dict, batch: tuple,
                 rounding: str, generator: torch.Generator | None) -> Any:
        return functional_call(student.module, self._quantized(layers, shadows, grids, rounding, generator), batch)

    def _kl(self, student: Graph, layers: list[Layer], shadows: dict, grids: dict, batches: list,
            targets: list) -> float:
        """Mean KL(teacher || student) at T = 1 with Q by nearest rounding: the packed graph's."""
        with torch.no_grad():
            values = [softened_kl(output_tensor(self._forward(student, layers, shadows, grids, batch, "nearest",
                                                              None)), target, 1.0)
                      for batch, target in zip(batches, targets)]
        return float(sum(values) / len(values))

    def _masks(self, student: Graph, trained: list[torch.nn.Parameter]) -> list[tuple[Tensor, Tensor]]:
        """(tensor, keep) of the pruned tensors being trained: pruned weights stay zero, as distill keeps them."""
        ids = {id(p) for p in trained}
        return [(student.attribute(path), keep.to(student.attribute(path).dtype))
                for path, keep in student.masks.items() if id(student.attribute(path)) in ids]

    def _blockwise(self, graph: Graph, student: Graph, layers: list[Layer], shadows: dict, grids: dict,
                   floats: dict, batches: list, ctx: PassContext) -> list[dict]:
        """blockwise > 0: every block's W', grid and float parameters trained to give the input graph's block output."""
        if not self.blockwise:
            return []
        stack = self._stack(student)
        by_path = {layer.path: layer for layer in layers}

        def block_layers(block: Block) -> list[Layer]:
            return [by_path[path] for path in block.params if path in by_path]

        def params_of(block: Block) -> list[tuple[list[torch.nn.Parameter], float]]:
            mine = block_layers(block)
            return [([shadows[layer.path] for layer in mine], self.lr),
                    ([p for layer in mine if layer.path in grids for p in grids[layer.path].params], self.grid_lr),
                    (distinct(floats[path] for path in block.params if path in floats), self.lr)]

        masks = self._masks(student, [*shadows.values(), *floats.values()])

        def reapply_masks() -> None:
            with torch.no_grad():
                for tensor, keep in masks:
                    tensor.mul_(keep)

        return blockwise.reconstruct(
            student, graph, stack, batches, params_of,
            lambda block: self._quantized(block_layers(block), shadows, grids, "nearest", None),
            self.blockwise, ctx.progress, f"{self.name}: blocks", ctx.generator(), reapply_masks)

    def _train(self, student: Graph, layers: list[Layer], shadows: dict, grids: dict, floats: dict, batches: list,
               targets: list, ctx: PassContext) -> list[float]:
        """The end-to-end steps.  After blockwise reconstruction W' stays where its block put it, and the
        steps train the grid and the float parameters (EfficientQAT's end-to-end stage)."""
        if not self.steps:
            return []
        groups = [([] if self.blockwise else list(shadows.values()), self.lr), (distinct(floats.values()), self.lr),
                  ([p for g in grids.values() for p in g.params], self.grid_lr)]
        groups = [(params, lr) for params, lr in groups if params]
        params = [p for group, _ in groups for p in group]
        optimizer = torch.optim.Adam([{"params": group, "lr": lr} for group, lr in groups])
        schedule = cosine_decay(optimizer, self.steps)
        masks = self._masks(student, params)
        generator, losses, cursor = ctx.generator(), [], 0
        for _ in ctx.progress.track(range(self.steps), self.name, total=self.steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(self.batch):
                index = cursor % len(batches)
                cursor += 1
                with torch.enable_grad():
                    output = self._forward(student, layers, shadows, grids, batches[index], self.rounding, generator)
                    loss = distillation_loss(output, targets[index], batches[index], ctx, self.T, self.alpha)
                    grads = torch.autograd.grad(loss / self.batch, params, allow_unused=True)  # no .grad elsewhere
                for param, grad in zip(params, grads):
                    if grad is not None:
                        param.grad = grad if param.grad is None else param.grad + grad
                total += float(loss.detach()) / self.batch
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for tensor, keep in masks:
                    tensor.mul_(keep)
            losses.append(total)
        return losses


def distinct(params: Any) -> list[torch.nn.Parameter]:
    """Each tensor once (a tied tensor sits at several attribute paths; an optimizer must step it once)."""
    return list({id(p): p for p in params}.values())


def install(graph: Graph, path: str, value: Tensor) -> torch.nn.Parameter:
    """Put a fresh trainable Parameter holding `value` at `path` (and at every path sharing that tensor)."""
    old = graph.attribute(path)
    param = torch.nn.Parameter(value.detach().clone(), requires_grad=True)
    for other, tensor in graph.referenced_tensors().items():
        if tensor is old:
            owner, _, leaf = other.rpartition(".")
            holder = graph.module.get_submodule(owner) if owner else graph.module
            delattr(holder, leaf)
            holder.register_parameter(leaf, param)
    return param
