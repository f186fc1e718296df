"""TVM Relax backend: lowering (rules table), pipelines with CPU schedules, build, tuning.

TVM's CPU thread pool can never grow past its "max concurrency", which without
``TVM_NUM_THREADS`` is half the logical CPUs (it assumes hyper-threads): one
thread on a 2-core machine, where ``set_threads(2)`` then did nothing.  The
variable is set here (if the user has not) before the pool exists, so
``CompiledModel.set_threads`` works up to every CPU; compiled models start with
torch's thread count.
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from fxpress.backends.tvm.rules import RuleContext, register_lowering, registered_lowerings  # noqa: E402

__all__ = ["RuleContext", "register_lowering", "registered_lowerings"]
