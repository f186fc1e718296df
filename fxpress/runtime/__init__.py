"""Running models: resolving model specs, calibration data, evaluation, timing."""
from fxpress.runtime.evaluate import calibration_batches, evaluate
from fxpress.runtime.models import resolve_model
from fxpress.runtime.timing import Latency, measure_latency

__all__ = ["Latency", "calibration_batches", "evaluate", "measure_latency", "resolve_model"]
