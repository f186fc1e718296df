"""`import fxpress` changes no environment variable and imports no TVM; TVM's thread setting waits for TVM."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


def _run(script: str, **env: str) -> dict:
    """Run `script` in a fresh interpreter (TVM_NUM_THREADS unset unless given); its stdout as JSON."""
    environ = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"} | env
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            env=environ, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_fxpress_leaves_the_environment_alone():
    found = _run("""
        import json, os, sys
        before = dict(os.environ)
        import fxpress
        after = dict(os.environ)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        print(json.dumps({"changed": changed, "tvm": "tvm" in sys.modules}))
    """)
    assert found == {"changed": [], "tvm": False}


def test_backends_import_no_tvm_and_set_nothing_until_tvm_is_needed():
    found = _run("""
        import json, os, sys
        import fxpress
        fxpress.compile  # the backends and their registry
        from fxpress.passes.infra.targets import lowering_targets
        lowering_targets()["onnx"].can_lower("fxpress::merge_tokens")
        print(json.dumps({"tvm": "tvm" in sys.modules, "threads": os.environ.get("TVM_NUM_THREADS")}))
    """)
    assert found == {"tvm": False, "threads": None}


def test_prepare_runtime_sets_threads_unless_the_user_did():
    script = """
        import json, os
        from fxpress.backends.tvm import prepare_runtime
        prepare_runtime()
        print(json.dumps({"threads": os.environ["TVM_NUM_THREADS"]}))
    """
    assert _run(script) == {"threads": str(os.cpu_count() or 1)}
    assert _run(script, TVM_NUM_THREADS="3") == {"threads": "3"}
