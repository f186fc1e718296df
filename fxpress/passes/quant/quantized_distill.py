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

Sparsity masks a pruning pass left (`Graph.masks`) are re-applied to W' after every step.
Trained tensors are fresh clones: the input graph is never written.  Adam, `steps` steps cycling through
the calibration batches, `batch` batches per step, the learning rate decayed to 0 on a cosine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph
from fxpress.ops.quant import BITS, QUANTIZED_LINEAR, QUANTIZED_OPS, decode, encode, group_params, quant_form
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.losses import default_task_loss, looks_like_lm
from fxpress.passes.infra.registry import register_pass
from fxpress.passes.quant.layers import WeightUse, nearest_linears, weight_uses
from fxpress.passes.quant.quantize import Layer, Quantize, layer_weight

_STOPS = ("matmul", "conv", "binary", "attention", "embedding")  # a path from an input through these is not "first"


# -- the quantizer in the forward ------------------------------------------------------------------
def grouped(weight: Tensor, group: int) -> tuple[Tensor, int]:
    """(N, K) -> (N, Kp / group, group), zero-padded to Kp (a multiple of group), and Kp."""
    rows, features = weight.shape
    padded = math.ceil(features / group) * group
    return F.pad(weight, (0, padded - features)).view(rows, padded // group, group), padded


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


def cosine_decay(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * (1 + cos(pi * step / steps)) / 2: the last steps settle on the grid instead of hopping across it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


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
    steps: int = 100
    lr: float = 1e-4  # Adam's peak step, decayed to 0 on a cosine
    batch: int = 1  # calibration batches per optimizer step (their gradients are summed)
    quantize_first_last: bool = False  # quantize the head and the first linears too
    init: Literal["rtn", "gptq"] = "rtn"  # shadow weights start at W (RTN) or at GPTQ's dequantized W
    train_float: bool = True  # also train the float parameters (biases, norms, float layers)
    teacher: Literal["input", "context"] = "input"  # the input graph, or ctx.teacher
    targets: tuple[str, ...] = ()  # as quantize
    skip: tuple[str, ...] = ()
    pad: bool = False

    def __post_init__(self) -> None:
        check_quant_options(self, self.bits, self.group, self.scheme, self.zero)
        if self.steps < 1 or self.batch < 1 or not self.lr > 0 or not self.T > 0 or not 0 <= self.alpha <= 1:
            raise self.bad_option(f"steps and batch must be >= 1, lr and T > 0, alpha in [0, 1]; got steps="
                                  f"{self.steps}, batch={self.batch}, lr={self.lr}, T={self.T}, alpha={self.alpha}")

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

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.requires(graph, ctx)
        started = time.perf_counter()
        batches = ctx.require_calibration(self.name)
        quantizer = self.quantizer(graph)
        layers, _ = quantizer.plan(graph)
        targets = teacher_outputs(resolve_teacher(graph, ctx, self.teacher, self.name), batches)
        student = graph.copy()
        shadows = self._shadows(student, layers, quantizer, ctx)
        floats = self._float_params(student, layers) if self.train_float else []
        initial = {layer.path: layer_weight(graph, layer) for layer in layers}
        kl_before = self._kl(student, layers, shadows, batches, targets)
        losses = self._train(student, layers, shadows, floats, batches, targets, ctx)
        kl_after = self._kl(student, layers, shadows, batches, targets)
        for param in [*shadows.values(), *floats]:
            param.grad = None
            param.requires_grad_(False)
        result = replace(quantizer, method="rtn").rewrite(student, ctx)
        stats = result.stats
        for layer in layers:
            entry = stats["per_layer"][layer.name]
            trained = layer_weight(student, layer)
            entry["weight_change"] = round(float((trained - initial[layer.path]).norm() /
                                                 initial[layer.path].norm().clamp_min(1e-12)), 6)
        window = max(1, min(len(batches), self.steps // 4))
        stats.update(method=f"quantized-distill ({self.init} init)", steps=self.steps, rounding=self.rounding,
                     task_loss=task_loss_kind(ctx, batches[0], targets[0]) or "none (no labels: T^2 KL only)",
                     loss_first=round(sum(losses[:window]) / window, 6),
                     loss_last=round(sum(losses[-window:]) / window, 6),
                     kl_before=round(kl_before, 6), kl_after=round(kl_after, 6),
                     trained_float_params=sum(p.numel() for p in floats),
                     seconds=round(time.perf_counter() - started, 2))
        return PassResult(result.graph, modified=True, stats=stats)

    def _shadows(self, student: Graph, layers: list[Layer], quantizer: Quantize,
                 ctx: PassContext) -> dict[str, torch.nn.Parameter]:
        """Fresh trainable shadow weights at each layer's path, starting at W or GPTQ's W."""
        xtx = quantizer.input_statistics(student, layers, ctx) if self.init == "gptq" else {}
        shadows = {}
        for layer in layers:
            weight = layer_weight(student, layer)
            if self.init == "gptq":
                weight = quantizer.quantize_layer(weight, quantizer.layer_xtx(layer, xtx))[0].dequantize()
            stored = weight.t() if layer.transposed else weight
            shadows[layer.path] = install(student, layer.path, stored.contiguous())
        return shadows

    @staticmethod
    def _float_params(student: Graph, layers: list[Layer]) -> list[torch.nn.Parameter]:
        quantized = {id(student.attribute(layer.path)) for layer in layers}
        params: dict[int, torch.nn.Parameter] = {}
        for path, tensor in student.referenced_tensors().items():
            if isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point() and id(tensor) not in quantized:
                params.setdefault(id(tensor), install(student, path, tensor.detach().clone()))
        return list(params.values())

    def _forward(self, student: Graph, layers: list[Layer], shadows: dict, batch: tuple, rounding: str,
                 generator: torch.Generator | None) -> Any:
        overrides = {}
        for layer in layers:
            shadow = shadows[layer.path]
            weight = shadow.t() if layer.transposed else shadow
            quantized = ste(weight, fake_quantize(weight, self.bits, self.group, quant_form(self.scheme, self.zero),
                                                  rounding, generator))
            overrides[layer.path] = quantized.t() if layer.transposed else quantized
        return functional_call(student.module, overrides, batch)

    def _kl(self, student: Graph, layers: list[Layer], shadows: dict, batches: list, targets: list) -> float:
        """Mean KL(teacher || student) at T = 1 with Q by nearest rounding: the packed graph's."""
        with torch.no_grad():
            values = [softened_kl(output_tensor(self._forward(student, layers, shadows, batch, "nearest", None)),
                                  target, 1.0) for batch, target in zip(batches, targets)]
        return float(sum(values) / len(values))

    def _train(self, student: Graph, layers: list[Layer], shadows: dict, floats: list, batches: list,
               targets: list, ctx: PassContext) -> list[float]:
        params = [*shadows.values(), *floats]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        schedule = cosine_decay(optimizer, self.steps)
        trained = {id(p) for p in params}  # pruned weights (Graph.masks) stay zero, as distill keeps them
        masks = [(student.attribute(path), keep.to(student.attribute(path).dtype))
                 for path, keep in student.masks.items() if id(student.attribute(path)) in trained]
        generator, losses, cursor = ctx.generator(), [], 0
        for _ in ctx.progress.track(range(self.steps), self.name, total=self.steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(self.batch):
                index = cursor % len(batches)
                cursor += 1
                with torch.enable_grad():
                    output = self._forward(student, layers, shadows, batches[index], self.rounding, generator)
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
