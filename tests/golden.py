"""Golden text files for tests: compare printed IR with a file, rewrite it on request."""
from __future__ import annotations

import difflib
import os
from pathlib import Path


def check_golden(folder: Path, name: str, text: str) -> None:
    """Compare `text` with `folder`/`name`; rewrite the file instead when FXPRESS_UPDATE_GOLDEN=1."""
    path = folder / name
    if os.environ.get("FXPRESS_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing golden file {path}; create it with FXPRESS_UPDATE_GOLDEN=1"
    expected = path.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                        f"golden/{name}", "printed"))
    assert text == expected, f"printed IR differs from golden/{name}:\n{diff}"
