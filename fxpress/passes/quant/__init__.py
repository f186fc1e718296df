"""Quantization: weights in packed low-bit groups on fxpress::quantized_linear: round to nearest or GPTQ
(`quantize`), shadow weights trained through the quantizer (`quantized-distill`), learned codebooks (`diff-quant`)."""
from fxpress.passes.quant import diff_quant, quantize, quantized_distill  # noqa: F401
