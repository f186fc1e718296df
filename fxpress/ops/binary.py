"""IR ops for binary layers, registered with torch.library under `fxpress::`.

Trainable forms (what `binarize` emits); `sign(v)` is +1 where v >= 0, else -1:

    fxpress.binary_linear(x, weight, scale, bias)
        = (sign(x) @ sign(weight).T) * scale + bias
    fxpress.binary_conv2d(x, weight, scale, bias, stride, padding, dilation)
        = conv2d(sign(x), sign(weight), stride, padding, dilation) * scale[c] + bias[c]

`weight` is the latent float weight; `scale` and `bias` are per output
channel (shape (C_out,)) or None.  Zero padding pads sign(x) with 0, as
conv2d does.  Backward is the straight-through estimator of
`fxpress.zoo.bnn.sign_ste`: d sign(v) / dv = 1{|v| <= 1}.

Frozen MST-reuse forms (what `xnor-mst` emits), equal to the forms above:

    fxpress.binary_linear_mst(x, packed_weight, plan, scale, bias)
    fxpress.binary_conv2d_mst(x, packed_weight, plan, scale, bias, kernel_size, stride, padding, dilation)

`packed_weight` is int64 (C_out, ceil(K / 64)): bit k of row j is set
where sign(weight[j]).flatten()[k] = -1 (K = C_in * kh * kw, PyTorch's
flatten order).  `plan` is an int32 vector (see `ReusePlan`) giving the
order in which channels are computed, each one's parent and the
positions where the two differ; the reference implementation here replays
it (y_j = y_parent + 2 * sum_{p in D} w_j[p] x[p]) in integer-exact float
arithmetic.  Every op has a fake implementation, so graphs holding them
can be exported again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fxpress.ir.opinfo import OpInfo, define_op
from fxpress.ops.aten import conv_macs, linear_macs
from fxpress.ops.flow_rules import linear_flow

PLAN_HEADER = 2  # plan[0] = C_out, plan[1] = K


def binary_sign(x: Tensor) -> Tensor:
    """+1 where x >= 0, else -1 (NaN -> -1), in x's dtype."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _sign_ste(x: Tensor) -> Tensor:
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (binary_sign(x) - clipped).detach()


def _affine(out: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], channel_dim: int) -> Tensor:
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    if scale is not None:
        out = out * scale.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


def _conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# -- packing ------------------------------------------------------------------------------
def pack_bits(negative: np.ndarray) -> np.ndarray:
    """(rows, K) bool, True for -1 -> (rows, ceil(K/64)) uint64, bit k%64 of word k//64."""
    rows, k = negative.shape
    packed = np.packbits(negative.astype(bool), axis=1, bitorder="little")
    padded = np.zeros((rows, math.ceil(k / 64) * 8), dtype=np.uint8)
    padded[:, :packed.shape[1]] = packed
    return padded.view("<u8")


def pack_weight(weight: Tensor) -> Tensor:
    """Latent weight (C_out, ...) -> int64 (C_out, ceil(K/64)) of sign bits (1 = -1)."""
    negative = ~(weight.detach().reshape(weight.shape[0], -1) >= 0)
    return torch.from_numpy(pack_bits(negative.numpy()).view(np.int64).copy())


def unpack_signs(packed: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """int64 (rows, words) -> (rows, k) of +1 / -1 in `dtype`."""
    raw = np.ascontiguousarray(packed.detach().numpy()).view(np.uint8)
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :k]
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float32)).to(dtype)


# -- reuse plans ----------------------------------------------------------------------------
@dataclass
class ReusePlan:
    """The order of computing output channels and what each reuses.

    `channels[s]` is computed at step s from `parents[s]` (an earlier
    channel; -1 for the root, step 0); `positions[s]` lists the weight
    positions where the two differ (all K for the root).  As a tensor:
    int32 [C, K, channels(C), parents(C), offsets(C + 1), positions...].
    """

    k: int
    channels: np.ndarray
    parents: np.ndarray
    positions: list[np.ndarray]

    @property
    def bitops(self) -> int:
        """Bit operations per output position: the root in full plus every |D|."""
        return int(sum(len(p) for p in self.positions))

    @property
    def depths(self) -> np.ndarray:
        """Depth of every step's channel (root 0)."""
        depth_of = {}
        for channel, parent in zip(self.channels.tolist(), self.parents.tolist()):
            depth_of[channel] = 0 if parent < 0 else depth_of[parent] + 1
        return np.array([depth_of[c] for c in self.channels.tolist()], dtype=np.int64)

    def to_tensor(self) -> Tensor:
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.positions])])
        body = [np.array([len(self.channels), self.k]), self.channels, self.parents, offsets,
                *self.positions]
        return torch.from_numpy(np.concatenate(body).astype(np.int32))

    @classmethod
    def from_tensor(cls, plan: Tensor) -> ReusePlan:
        values = plan.detach().numpy().astype(np.int64)
        count, k = int(values[0]), int(values[1])
        channels, parents = values[2:2 + count], values[2 + count:2 + 2 * count]
        offsets = values[2 + 2 * count:3 + 3 * count]
        body = values[3 + 3 * count:]
        return cls(k, channels, parents, [body[offsets[s]:offsets[s + 1]] for s in range(count)])

    def delta_weights(self, signs: Tensor) -> Tensor:
        """(C, K) rows: w_root for the root, 2 * w_j masked to D(parent, j) for the others."""
        delta = torch.zeros_like(signs)
        for channel, parent, where in zip(self.channels.tolist(), self.parents.tolist(), self.positions):
            index = torch.from_numpy(where)
            delta[channel, index] = signs[channel, index] * (1.0 if parent < 0 else 2.0)
        return delta

    def accumulate(self, partial: Tensor, channel_dim: int) -> Tensor:
        """y_j = partial_j + y_parent(j), level by level down the tree (in place on a copy)."""
        out = partial.movedim(channel_dim, 0).clone()
        depths = self.depths
        for level in range(1, int(depths.max(initial=0)) + 1):
            at = depths == level
            children = torch.from_numpy(self.channels[at])
            out[children] += out[torch.from_numpy(self.parents[at])]
        return out.movedim(0, channel_dim)


def _replay(cols: Tensor, packed_weight: Tensor, plan: Tensor) -> Tensor:
    """(..., K, L) columns of signs -> (..., C, L) outputs by replaying the plan."""
    reuse = ReusePlan.from_tensor(plan)
    delta = reuse.delta_weights(unpack_signs(packed_weight, reuse.k, cols.dtype))
    return reuse.accumulate(delta @ cols, channel_dim=-2)


# -- trainable ops --------------------------------------------------------------------------
def _linear_ste(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], sign) -> Tensor:
    return _affine(F.linear(sign(x), sign(weight)), scale, bias, -1)


def _conv_ste(x, weight, scale, bias, stride, padding, dilation, sign) -> Tensor:
    out = F.conv2d(sign(x), sign(weight), None, stride, padding, dilation)
    return _affine(out, scale, bias, 1)


@torch.library.custom_op("fxpress::binary_linear", mutates_args=())
def binary_linear(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """(sign(x) @ sign(weight).T) * scale + bias."""
    return _linear_ste(x, weight, scale, bias, binary_sign)


@binary_linear.register_fake
def _(x, weight, scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fxpress::binary_conv2d", mutates_args=())
def binary_conv2d(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor],
                  stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """conv2d(sign(x), sign(weight)) * scale + bias, per output channel."""
    return _conv_ste(x, weight, scale, bias, stride, padding, dilation, binary_sign)


def _conv_out_shape(x: Tensor, c_out: int, kernel: list[int], stride, padding, dilation) -> tuple:
    size = [_conv_out_size(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2)]
    return (x.shape[0], c_out, *size)


@binary_conv2d.register_fake
def _(x, weight, scale, bias, stride, padding, dilation):
    return x.new_empty(_conv_out_shape(x, weight.shape[0], list(weight.shape[2:]), stride, padding, dilation))


def _ste_backward(forward, ctx, grad: Tensor):
    """Gradients by re-running `forward` with sign_ste (recomputation, no saved activations)."""
    inputs = ctx.saved_tensors
    leaves = [t.detach().requires_grad_(bool(need)) if t is not None else None
              for t, need in zip(inputs, ctx.needs_input_grad)]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    with torch.enable_grad():
        out = forward(*leaves, *ctx.extra, _sign_ste)
    found = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    grads = [next(found) if t is not None and t.requires_grad else None for t in leaves]
    return (*grads, *([None] * len(ctx.extra)))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.extra = tuple(inputs[4:])


binary_linear.register_autograd(lambda ctx, grad: _ste_backward(_linear_ste, ctx, grad), setup_context=_setup)
binary_conv2d.register_autograd(lambda ctx, grad: _ste_backward(_conv_ste, ctx, grad), setup_context=_setup)


# -- frozen MST-reuse ops ---------------------------------------------------------------------
@torch.library.custom_op("fxpress::binary_linear_mst", mutates_args=())
def binary_linear_mst(x: Tensor, packed_weight: Tensor, plan: Tensor, scale: Optional[Tensor],
                      bias: Optional[Tensor]) -> Tensor:
    """binary_linear with channels computed along the reuse plan."""
    cols = binary_sign(x).reshape(-1, x.shape[-1]).T
    out = _replay(cols, packed_weight, plan).T.reshape(*x.shape[:-1], -1).contiguous()
    return _affine(out, scale, bias, -1)


@binary_linear_mst.register_fake
def _(x, packed_weight, plan, scale, bias):
    return x.new_empty((*x.shape[:-1], packed_weight.shape[0]))


@torch.library.custom_op("fxpress::binary_conv2d_mst", mutates_args=())
def binary_conv2d_mst(x: Tensor, packed_weight: Tensor, plan: Tensor, scale: Optional[Tensor],
                      bias: Optional[Tensor], kernel_size: list[int], stride: list[int],
                      padding: list[int], dilation: list[int]) -> Tensor:
    """binary_conv2d with channels computed along the reuse plan."""
    shape = _conv_out_shape(x, packed_weight.shape[0], kernel_size, stride, padding, dilation)
    cols = F.unfold(binary_sign(x), kernel_size, dilation, padding, stride)
    out = _replay(cols, packed_weight, plan).reshape(shape).contiguous()
    return _affine(out, scale, bias, 1)


@binary_conv2d_mst.register_fake
def _(x, packed_weight, plan, scale, bias, kernel_size, stride, padding, dilation):
    return x.new_empty(_conv_out_shape(x, packed_weight.shape[0], kernel_size, stride, padding, dilation))


ops = torch.ops.fxpress
TRAINABLE_OPS = (ops.binary_linear.default, ops.binary_conv2d.default)
MST_OPS = (ops.binary_linear_mst.default, ops.binary_conv2d_mst.default)
BINARY_OPS = TRAINABLE_OPS + MST_OPS


def _mst_macs(node: object, arg_shapes: list, out: tuple) -> int:
    """Bit-ops of an MST op: output positions x (K for the root + every |D|), read off the plan's length."""
    packed, plan = arg_shapes[1], arg_shapes[2]
    if not packed or not plan:
        return 0
    channels = packed[0]
    return math.prod(out) // channels * (plan[0] - PLAN_HEADER - 3 * channels - 1)


# Binary MACs count like float ones (one per weight and output position); the MST forms count what
# the plan computes.
define_op(OpInfo(ops.binary_linear.default, "binary", linear_macs, linear_flow))
define_op(OpInfo(ops.binary_conv2d.default, "binary", conv_macs))
define_op(OpInfo(ops.binary_linear_mst.default, "binary", _mst_macs, linear_flow))
define_op(OpInfo(ops.binary_conv2d_mst.default, "binary", _mst_macs))
