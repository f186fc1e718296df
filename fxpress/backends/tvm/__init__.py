"""TVM Relax backend: lowering (rules table), pipelines with CPU schedules, build, tuning."""
from fxpress.backends.tvm.rules import RuleContext, register_lowering, registered_lowerings

__all__ = ["RuleContext", "register_lowering", "registered_lowerings"]
