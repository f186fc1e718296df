"""Native CPU kernels for binary layers (bit packing, XNOR-popcount GEMM / conv, MST reuse) and the lowering
of quantized linears onto fxpress/ops/native_quant.py's kernels (`quant_lowering.py`).

The C source (`binary_kernels.c`) is compiled with the system compiler on
first use (`build.py`) and called through ctypes (`kernels.py`);
`run_native(graph)` lowers a graph's binary ops onto them (`lowering.py`).
"""
from fxpress.backends.native.build import build_library, find_compiler
from fxpress.backends.native.lowering import NativeBinaryLayer, NativeProgram, lower_native, run_native
from fxpress.backends.native.quant_lowering import OUTPUT_TOLERANCE, NativeQuantLinear, outputs_agree

__all__ = ["OUTPUT_TOLERANCE", "NativeBinaryLayer", "NativeProgram", "NativeQuantLinear", "build_library",
           "find_compiler", "lower_native", "outputs_agree", "run_native"]
