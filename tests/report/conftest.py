"""The demo, run once for the report tests (it compiles two graphs for the host CPU: ~45 s)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """(the finished `fxpress demo`, the folder it ran in: its report is fxpress-demo.html there)."""
    folder = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "fxpress.cli", "--threads", "1", "demo", "--batch", "16"],
                            capture_output=True, text=True, cwd=folder, env=env, timeout=600)
    return result, folder
