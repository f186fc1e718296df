"""Evaluation: task metrics (accuracy, perplexity, retrieval MRR), calibration batches, latency."""
from fxpress.eval.evaluate import calibration_batches, evaluate
from fxpress.utils.timing import Latency, measure_latency  # re-exported: latency is part of evaluation

__all__ = ["Latency", "calibration_batches", "evaluate", "measure_latency"]
