"""Quantization: weights in packed low-bit groups (round to nearest or GPTQ) on fxpress::quantized_linear."""
from fxpress.passes.quant import quantize  # noqa: F401
