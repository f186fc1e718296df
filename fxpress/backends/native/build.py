"""The binary kernels' library: `binary_kernels.c` built on first use by `fxpress.utils.cbuild`.

    python -c "from fxpress.backends.native import build_library; print(build_library())"
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from fxpress.utils import cbuild
from fxpress.utils.cbuild import find_compiler

SOURCE = Path(__file__).with_name("binary_kernels.c")


def library_path(compiler: str, source: Path | None = None) -> Path:
    """The cache path of the library built from `source` (default: the binary kernels)."""
    return cbuild.library_path(compiler, SOURCE if source is None else source)


def build_library(force: bool = False, source: Path | None = None) -> Path:
    """Build the binary kernels (or `source`) if the cache lacks them; return the library's path."""
    return cbuild.build_library(SOURCE if source is None else source, force=force)


@functools.lru_cache(maxsize=None)
def load_library() -> ctypes.CDLL:
    """The kernel library, built first if needed; loaded once per process."""
    return ctypes.CDLL(str(build_library()))


__all__ = ["SOURCE", "build_library", "find_compiler", "library_path", "load_library"]
