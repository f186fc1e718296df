"""Where fxpress keeps what it builds once: $FXPRESS_CACHE, else ~/.cache/fxpress."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$FXPRESS_CACHE, else ~/.cache/fxpress (native kernels, the CLI's target table, converted models)."""
    root = os.environ.get("FXPRESS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fxpress"
