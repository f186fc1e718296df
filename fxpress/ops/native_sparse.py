"""Python binding of `sparse_linear.c`: the token-minor CPU kernel of `fxpress::sparse_linear`.

Built on first use by fxpress.utils.cbuild (cached under $FXPRESS_CACHE/native like the other
kernels).  `sparse_linear` takes float32 CPU tensors in the layout of `fxpress.ops.sparse` and
returns y = x @ W.T + bias; `available()` is False where no C compiler (or no working build)
exists, and callers then use the torch path.  `LEVELS` names the vector paths; `simd_level()`
says which one the build runs by default, and `level=` forces a lower one (for tests).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fxpress.errors import LoweringError
from fxpress.utils.cbuild import kernels_available, load_kernels

SOURCE = Path(__file__).with_name("sparse_linear.c")
LEVELS = {"best": 0, "scalar": 1, "avx2": 2, "avx512": 3}
_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The compiled sparse kernels with their ctypes signatures set (built first if needed)."""
    return load_kernels(SOURCE, {
        "fxp_sparse_linear": ([_P, _I, _I, _P, _P, _P, _P, _I, _I, ctypes.c_int, _P], ctypes.c_int),
        "fxp_sparse_simd_level": ([], ctypes.c_int)})


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernel builds and loads here (once per process; failures are logged, not raised)."""
    return kernels_available(library, "sparse_linear kernel")


def simd_level() -> str:
    """The path the build runs by default: 'avx512', 'avx2' or 'scalar'."""
    level = library().fxp_sparse_simd_level()
    return next(name for name, value in LEVELS.items() if value == level)


def sparse_linear(x: torch.Tensor, values: torch.Tensor, col_index: torch.Tensor, row_ptr: torch.Tensor,
                  bias: torch.Tensor | None, out_features: int, level: str = "best") -> torch.Tensor:
    """y (..., out_features) = x (..., K) @ W.T + bias, W in the compressed layout of fxpress.ops.sparse
    (values (nnz, block_rows) float32, col_index and row_ptr int32).  The C code trusts the layout:
    callers check it (`fxpress.ops.sparse.check_layout`)."""
    if level not in LEVELS:
        raise ValueError(f"sparse_linear: unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    k = x.shape[-1]
    rows = x.reshape(-1, k).contiguous()
    values, col_index, row_ptr = values.contiguous(), col_index.contiguous(), row_ptr.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    status = library().fxp_sparse_linear(
        rows.data_ptr(), rows.shape[0], k, values.data_ptr(), col_index.data_ptr(), row_ptr.data_ptr(),
        None if bias is None else bias.data_ptr(), out_features, values.shape[-1], LEVELS[level],
        out.data_ptr())
    if status == -1:
        raise MemoryError("sparse_linear: out of memory for scratch space")
    if status != 0:
        raise LoweringError(f"sparse_linear: block_rows {values.shape[-1]} is neither 1 nor 4")
    return out.view(*x.shape[:-1], out_features)
