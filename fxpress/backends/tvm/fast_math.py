"""Vectorizable exp / erf / tanh for CPU: polynomial legalizations of softmax, GELU, SiLU...

LLVM turns a vectorized ``tir.exp`` or ``tir.erf`` into one libm call per lane
(``expf``, ``erff``), so softmax and GELU ran scalar and dominated vit-mnist.
These legalizations build the same TE computes as TVM's defaults but with
the transcendental written as float32 arithmetic that LLVM vectorizes:

- exp: Cephes ``expf`` (range reduction by ln 2 in two parts, degree-6
  polynomial, 2^n by building the exponent bits); max relative error 1.2e-7
  on [-87, 88]; below -87.3 it is 0, above 88.37 it is +inf.
- erf, tanh: Eigen's rational approximations (``generic_fast_erf_float``,
  ``generic_fast_tanh_float``); max absolute error 4.2e-7.
- sigmoid = 1 / (1 + exp(-x)), so SiLU and tanh-GELU follow.
- cosh, sinh (every float dtype): TVM's CPU codegen has no vector form of
  ``tir.cosh`` / ``tir.sinh`` (a vectorized schedule failed to build), so
  they are written with exp (and sinh with its series near 0).

Otherwise only float32 inputs are rewritten; other dtypes keep TVM's legalization.
``legalize_map()`` is what ``relax.transform.LegalizeOps`` takes.
"""
from __future__ import annotations

import math
from typing import Callable

from tvm import te, tirx

EXP_LOW, EXP_HIGH = -87.33654, 88.37626  # exp(EXP_LOW) ~ FLT_MIN; exp(EXP_HIGH) ~ FLT_MAX
LOG2E = 1.44269504088896341
LN_FLT_MAX = 88.72283905206835
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4  # ln 2 = LN2_HIGH + LN2_LOW, HIGH exact in few bits
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
            5.0000001201e-1)
ERF_CLAMP = 4.0
ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
           -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
           -1.42647390514189e-02)
TANH_CLAMP = 7.90531110763549805
TANH_NUM = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
            1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH_DEN = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def _f32(value: float) -> tirx.Expr:
    return tirx.const(value, "float32")


def _horner(x: tirx.Expr, coefficients: tuple[float, ...]) -> tirx.Expr:
    """c0*x^(n-1) + ... + c_(n-1), highest degree first."""
    result = _f32(coefficients[0])
    for coefficient in coefficients[1:]:
        result = result * x + _f32(coefficient)
    return result


def _clamp(x: tirx.Expr, low: float, high: float) -> tirx.Expr:
    return tirx.max(tirx.min(x, _f32(high)), _f32(low))


def fast_exp(x: tirx.Expr) -> tirx.Expr:
    """exp(x) for float32 as vectorizable arithmetic (Cephes expf)."""
    clamped = _clamp(x, EXP_LOW, EXP_HIGH)
    n = tirx.floor(clamped * _f32(LOG2E) + _f32(0.5))
    r = clamped - n * _f32(LN2_HIGH) - n * _f32(LN2_LOW)
    poly = _horner(r, EXP_POLY) * r * r + r + _f32(1.0)
    exponent = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    value = poly * tirx.reinterpret("float32", exponent)
    value = tirx.Select(x < _f32(EXP_LOW), _f32(0.0), value)
    return tirx.Select(x > _f32(EXP_HIGH), _f32(math.inf), value)


def _odd_rational(x: tirx.Expr, clamp: float, numerator: tuple, denominator: tuple) -> tirx.Expr:
    clamped = _clamp(x, -clamp, clamp)
    square = clamped * clamped
    return clamped * _horner(square, numerator) / _horner(square, denominator)


def fast_erf(x: tirx.Expr) -> tirx.Expr:
    """erf(x) for float32 (Eigen's rational approximation on [-4, 4], +-1 outside)."""
    return _odd_rational(x, ERF_CLAMP, ERF_NUM, ERF_DEN)


def fast_tanh(x: tirx.Expr) -> tirx.Expr:
    """tanh(x) for float32 (Eigen's rational approximation)."""
    return _odd_rational(x, TANH_CLAMP, TANH_NUM, TANH_DEN)


def fast_sigmoid(x: tirx.Expr) -> tirx.Expr:
    return _f32(1.0) / (_f32(1.0) + fast_exp(-x))


def _gelu(x: tirx.Expr) -> tirx.Expr:
    return x * (_f32(0.5) + fast_erf(x * _f32(0.5 ** 0.5)) * _f32(0.5))


def _gelu_tanh(x: tirx.Expr) -> tirx.Expr:
    inner = _f32(math.sqrt(2.0 / math.pi)) * x * (_f32(1.0) + _f32(0.044715) * x * x)
    return _f32(0.5) * x * (_f32(1.0) + fast_tanh(inner))


def _const(value: float, like: tirx.Expr) -> tirx.Expr:
    return tirx.const(value, str(like.dtype))


def _half_exp_abs(x: tirx.Expr, exp: Callable) -> tirx.Expr:
    """exp(|x|) / 2; for float32 infinite above ln(FLT_MAX), where PyTorch's cosh overflows
    (fast_exp saturates a little earlier, so large |x| go through exp(|x| - ln 2))."""
    magnitude = tirx.abs(x)
    if exp is not fast_exp:
        return exp(magnitude) * _const(0.5, x)
    value = tirx.Select(magnitude > _f32(LN_FLT_MAX - 1.0), fast_exp(magnitude - _f32(math.log(2.0))),
                        fast_exp(magnitude) * _f32(0.5))
    return tirx.Select(magnitude > _f32(LN_FLT_MAX), _f32(math.inf), value)


def cosh_expr(x: tirx.Expr, exp: Callable = tirx.exp) -> tirx.Expr:
    """cosh(x) = e^|x|/2 + e^-|x|/2 through `exp` (TVM's CPU codegen has no vector cosh)."""
    half = _half_exp_abs(x, exp)
    return half + _const(0.25, x) / half


SINH_SERIES = tuple(1.0 / math.factorial(k) for k in range(17, 0, -2))  # x^17/17! + ... + x


def sinh_expr(x: tirx.Expr, exp: Callable = tirx.exp) -> tirx.Expr:
    """sinh(x): its Taylor series below |x| = 1 (no cancellation near 0; truncation error < 3e-15),
    sign(x) (e^|x|/2 - e^-|x|/2) above (TVM's CPU codegen has no vector sinh)."""
    square = x * x
    series = _const(SINH_SERIES[0], x)
    for coefficient in SINH_SERIES[1:]:
        series = series * square + _const(coefficient, x)
    half = _half_exp_abs(x, exp)
    outer = half - _const(0.25, x) / half
    outer = tirx.Select(x < _const(0.0, x), -outer, outer)
    return tirx.Select(tirx.abs(x) < _const(1.0, x), x * series, outer)


ELEMENTWISE: dict[str, tuple[str, Callable]] = {
    "relax.exp": ("fast_exp", fast_exp),
    "relax.erf": ("fast_erf", fast_erf),
    "relax.tanh": ("fast_tanh", fast_tanh),
    "relax.sigmoid": ("fast_sigmoid", fast_sigmoid),
    "relax.nn.silu": ("fast_silu", lambda x: x * fast_sigmoid(x)),
    "relax.nn.gelu": ("fast_gelu", _gelu),
    "relax.nn.gelu_tanh": ("fast_gelu_tanh", _gelu_tanh),
}


def softmax_te(x: te.Tensor, axis: int) -> te.Tensor:
    """TOPI's softmax (max, exp, sum, normalize: same block names) with fast_exp."""
    shape = list(x.shape)
    axis = axis + len(shape) if axis < 0 else axis
    reduced = shape[:axis] + shape[axis + 1:]

    def with_k(indices, k):
        return (*indices[:axis], k, *indices[axis:])

    def drop_axis(indices):
        return (*indices[:axis], *indices[axis + 1:])

    k1 = te.reduce_axis((0, shape[axis]), name="k")
    max_elem = te.compute(reduced, lambda *i: te.max(x[with_k(i, k1)], axis=k1), name="T_softmax_maxelem")
    exp = te.compute(shape, lambda *i: fast_exp(x[i] - max_elem[drop_axis(i)]), name="T_softmax_exp")
    k2 = te.reduce_axis((0, shape[axis]), name="k")
    expsum = te.compute(reduced, lambda *i: te.sum(exp[with_k(i, k2)], axis=k2), name="T_softmax_expsum")
    return te.compute(shape, lambda *i: exp[i] / expsum[drop_axis(i)], name="T_softmax_norm",
                      attrs={"axis": axis})


def _is_float32(call) -> bool:
    info = call.args[0].ty
    return str(getattr(info, "dtype", "")) == "float32"


def _default(op_name: str) -> Callable:
    import tvm

    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def _elementwise_rule(op_name: str) -> Callable:
    hint, expr = ELEMENTWISE[op_name]

    def legalize(bb, call):
        if not _is_float32(call):
            return _default(op_name)(bb, call)
        return bb.call_te(lambda x: te.compute(x.shape, lambda *i: expr(x[i]), name=hint), call.args[0],
                          primfunc_name_hint=hint)

    return legalize


def _softmax_rule(bb, call):
    if not _is_float32(call):
        return _default("relax.nn.softmax")(bb, call)
    return bb.call_te(softmax_te, call.args[0], int(call.attrs.axis), primfunc_name_hint="fast_softmax")


# Ops TVM legalizes to TIR intrinsics its CPU codegen cannot vectorize: written with exp, every float dtype.
THROUGH_EXP: dict[str, tuple[str, Callable]] = {
    "relax.cosh": ("cosh_via_exp", cosh_expr),
    "relax.sinh": ("sinh_via_exp", sinh_expr),
}


def _through_exp_rule(op_name: str) -> Callable:
    hint, expr = THROUGH_EXP[op_name]

    def legalize(bb, call):
        if not str(getattr(call.args[0].ty, "dtype", "")).startswith("float"):
            return _default(op_name)(bb, call)
        exp = fast_exp if _is_float32(call) else tirx.exp
        return bb.call_te(lambda x: te.compute(x.shape, lambda *i: expr(x[i], exp), name=hint), call.args[0],
                          primfunc_name_hint=hint)

    return legalize


def legalize_map() -> dict[str, Callable]:
    """Op name -> legalization for ``relax.transform.LegalizeOps(customize_legalize_map=...)``."""
    rules = {name: _elementwise_rule(name) for name in ELEMENTWISE}
    rules.update({name: _through_exp_rule(name) for name in THROUGH_EXP})
    rules["relax.nn.softmax"] = _softmax_rule
    return rules
