"""TVM Relax backend: lowering (rules table), pipelines with CPU schedules, build, tuning.

Importing this package imports neither TVM nor the rule modules and changes
no environment variable.  Two things happen on first use instead:

- :func:`load_rules` imports the rule modules listed in :data:`RULE_MODULES`
  (the one list of them), which register their rules in :mod:`.rules`.
- :func:`prepare_runtime` runs before fxpress first builds or loads with TVM.
  TVM's CPU thread pool can never grow past its "max concurrency", which
  without ``TVM_NUM_THREADS`` is half the logical CPUs (it assumes
  hyper-threads): one thread on a 2-core machine, where ``set_threads(2)``
  then did nothing.  The variable is set (if the user has not) before the
  pool exists, so ``CompiledModel.set_threads`` works up to every CPU;
  compiled models start with torch's thread count.
"""
from __future__ import annotations

import importlib
import os

from fxpress.backends.tvm.rules import RuleContext, register_lowering, registered_lowerings

# Every module of lowering rules -> the targets its rules build for (None: every TVM target).
RULE_MODULES: dict[str, tuple[str, ...] | None] = {
    "fxpress.backends.tvm.aten_rules": None,
    "fxpress.backends.tvm.token_rules": None,
    "fxpress.backends.tvm.kv_rules": None,
    "fxpress.backends.tvm.sparse_rules": ("llvm", "aarch64"),  # vectorized loops, no thread binding
    # CPU schedules (vector popcount tiles): `c` has no vector types, `cuda` no thread binding.
    "fxpress.backends.tvm.binary_rules": ("llvm", "aarch64"),
    # the codes' GEMV is a CPU schedule (vector columns, parallel panels)
    "fxpress.backends.tvm.quant_rules": ("llvm", "aarch64"),
}


def load_rules() -> None:
    """Import every rule module (each registers its rules); cheap after the first call."""
    for module in RULE_MODULES:
        importlib.import_module(module)


def rule_targets(rule: object) -> tuple[str, ...] | None:
    """The targets a registered rule builds for (None: all), from the module that defines it."""
    return RULE_MODULES.get(getattr(rule, "__module__", ""))


def prepare_runtime() -> None:
    """Set ``TVM_NUM_THREADS`` to every CPU unless the user set it; call before TVM's pool exists."""
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


__all__ = ["RULE_MODULES", "RuleContext", "load_rules", "prepare_runtime", "register_lowering",
           "registered_lowerings", "rule_targets"]
