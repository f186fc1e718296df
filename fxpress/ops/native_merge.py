"""Python binding of `token_merge.c`: the fused bipartite (ToMe) merge of `fxpress::merge_tokens`.

Built on first use by fxpress.utils.cbuild (cached under $FXPRESS_CACHE/native like the binary
kernels).  `bipartite_merge` takes float32 CPU tensors and the torch-computed similarity scores and
returns what `token_ops._bipartite` returns, bit for bit; `available()` is False where no C compiler
(or no working build) exists, and callers then use the torch path.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from fxpress.utils.cbuild import kernels_available, load_kernels
from fxpress.errors import LoweringError

SOURCE = Path(__file__).with_name("token_merge.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The compiled token kernels with their ctypes signature set (built first if needed)."""
    return load_kernels(SOURCE, {"fxp_bipartite_merge": ([_P, _P, _P, _I, _I, _I, _I, ctypes.c_int, _P, _P],
                                                         ctypes.c_int)})


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernel builds and loads here (once per process; failures are logged, not raised)."""
    return kernels_available(library, "fused merge_tokens kernel")


def bipartite_merge(x: torch.Tensor, size: torch.Tensor | None, scores: torch.Tensor, r: int,
                    protect_cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', size') of a bipartite merge of r tokens, from x (B, N, C), size (B, N, 1) or None and
    scores (B, N // 2, ceil(N / 2)) = unit B tokens @ unit A tokens^T.  float32 CPU tensors, r in
    [0, ceil(N / 2)]; inputs are made contiguous, the outputs are new tensors."""
    batch, tokens, channels = x.shape
    na, nb = (tokens + 1) // 2, tokens // 2
    if x.dtype != torch.float32 or scores.dtype != torch.float32 or (size is not None and size.dtype != torch.float32):
        raise LoweringError("bipartite_merge takes float32 tensors")
    if tuple(scores.shape) != (batch, nb, na) or not 0 <= r <= na:
        raise LoweringError(f"bipartite_merge: scores {tuple(scores.shape)} / r={r} do not fit x {tuple(x.shape)}")
    x, scores = x.contiguous(), scores.contiguous()
    size = None if size is None else size.contiguous()
    out = torch.empty(batch, tokens - r, channels)
    out_size = torch.empty(batch, tokens - r, 1)
    status = library().fxp_bipartite_merge(
        x.data_ptr(), None if size is None else size.data_ptr(), scores.data_ptr(), batch, tokens, channels,
        r, int(protect_cls), out.data_ptr(), out_size.data_ptr())
    if status != 0:
        raise MemoryError("bipartite_merge: out of memory for scratch space")
    return out, out_size
