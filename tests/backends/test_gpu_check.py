"""scripts/gpu_check.sh: on a machine without a GPU it says so and compiles nothing (exit 0)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("a GPU is present: run scripts/gpu_check.sh itself (it compiles and times every zoo model)")
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--json", str(out)], capture_output=True,
                          text=True, timeout=300, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "gpu_check: no GPU here, nothing compiled: TVM sees no CUDA device" in done.stdout
    data = json.loads(out.read_text())
    assert data["gpu"] is None and data["rows"] == [] and "nvidia-smi" in data["reason"]
