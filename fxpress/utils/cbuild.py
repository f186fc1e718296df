"""Compile a C source (plain C, no dependencies) into a shared library on first use, cached.

The shared library is built with the system C compiler (`$CC`, else `cc`)
into `$FXPRESS_CACHE/native/` (default `~/.cache/fxpress/native/`) under
a name that hashes the source, the flags, the compiler's version and the
CPU (`-march=native` code must not run on another CPU sharing the cache).
A changed source therefore builds a new library; concurrent builds write
to a temporary file and rename it into place.  If `-march=native` is
refused, the portable flags are tried before giving up with a
LoweringError that says what to install.  `FXPRESS_NATIVE_PORTABLE=1`
builds without `-march=native` (scalar popcount; for mixed machines).

The binary kernels (`fxpress/backends/native/binary_kernels.c`), the fused token merge
(`fxpress/ops/token_merge.c`) and the sparse linear (`fxpress/ops/sparse_linear.c`) are built this
way; `load_kernels` loads one with its ctypes signatures and `kernels_available` answers whether an
optional kernel works here (the op then falls back to PyTorch).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from fxpress.errors import LoweringError
from fxpress.utils.cache import cache_root

log = logging.getLogger(__name__)

BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fvisibility=hidden")
NATIVE_FLAGS = ("-march=native",)
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where built libraries live: $FXPRESS_CACHE/native, else ~/.cache/fxpress/native."""
    return cache_root() / "native"


def find_compiler() -> str:
    """Path of the C compiler ($CC or cc), or a LoweringError saying what to install."""
    wanted = os.environ.get("CC", "cc")
    found = shutil.which(wanted)
    if found is None:
        raise LoweringError(f"the native backend compiles its C kernels on first use but found no C compiler "
                            f"('{wanted}' is not on PATH); install one (e.g. `apt-get install gcc`), set CC, "
                            f"or run with --target eager")
    return found


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise LoweringError(f"the C compiler {compiler} does not run: {err}") from err
    return done.stdout.splitlines()[0] if done.stdout else ""


def _flag_sets() -> list[tuple[str, ...]]:
    """Flags to try in order: tuned for this CPU first, unless FXPRESS_NATIVE_PORTABLE=1."""
    portable = [BASE_FLAGS]
    return portable if os.environ.get("FXPRESS_NATIVE_PORTABLE") == "1" else [BASE_FLAGS + NATIVE_FLAGS] + portable


def library_path(compiler: str, source: Path) -> Path:
    """The cache path for the library built from `source` by `compiler` on this CPU."""
    source = Path(source)
    digest = hashlib.sha256()
    for part in (source.read_bytes(), repr(_flag_sets()).encode(),
                 _compiler_version(compiler).encode(), _cpu_signature().encode(), platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def _compile(compiler: str, target: Path, source: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(handle)
    errors = []
    try:
        for flags in _flag_sets():
            command = [compiler, *flags, str(source), "-o", temporary]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(temporary, target)
                log.info("built native kernels: %s", " ".join(command))
                return
            errors.append(f"$ {' '.join(command)}\n{done.stderr.strip()}")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    raise LoweringError("building the native kernels failed:\n" + "\n".join(errors))


def build_library(source: Path, force: bool = False) -> Path:
    """Build `source` if the cache lacks it (or `force`); return its path."""
    compiler = find_compiler()
    source = Path(source)
    target = library_path(compiler, source)
    with _LOCK:
        if force or not target.is_file():
            _compile(compiler, target, source)
    return target


def load_kernels(source: Path, signatures: dict[str, tuple[list, Any]]) -> ctypes.CDLL:
    """The library built from `source` (first if needed), each named function given its
    (argtypes, restype)."""
    lib = ctypes.CDLL(str(build_library(source)))
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def kernels_available(load: Callable[[], object], what: str) -> bool:
    """Whether `load()` builds and loads an optional kernel here; a failure is logged, not raised."""
    try:
        load()
    except (LoweringError, OSError) as err:
        log.info("%s unavailable, using the torch path: %s", what, err)
        return False
    return True
