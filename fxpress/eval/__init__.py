"""Evaluation: task metrics (accuracy, perplexity, retrieval MRR), calibration batches, task losses, latency,
and paired confidence intervals."""
from fxpress.eval.evaluate import calibration_batches, evaluate, task_loss_for
from fxpress.eval.retrieval import docs_mrr, docs_reciprocal_ranks
from fxpress.eval.stats import mean_ci, paired_bootstrap
from fxpress.utils.timing import Latency, measure_latency  # re-exported: latency is part of evaluation

__all__ = ["Latency", "calibration_batches", "docs_mrr", "docs_reciprocal_ranks", "evaluate", "mean_ci",
           "measure_latency", "paired_bootstrap", "task_loss_for"]
