"""Native CPU kernels for binary layers: bit packing, XNOR-popcount GEMM / conv, MST reuse.

The C source (`binary_kernels.c`) is compiled with the system compiler on
first use (`build.py`) and called through ctypes (`kernels.py`);
`run_native(graph)` lowers a graph's binary ops onto them (`lowering.py`).
"""
from fxpress.backends.native.build import build_library, find_compiler
from fxpress.backends.native.lowering import NativeBinaryLayer, NativeProgram, lower_native, run_native

__all__ = ["NativeBinaryLayer", "NativeProgram", "build_library", "find_compiler", "lower_native", "run_native"]
