"""Evaluation: task metrics (perplexity, accuracy, retrieval MRR, depth RMSE), data sources, calibration batches,
task losses, latency, and paired confidence intervals.

The metrics score eager modules, captured or compressed Graphs and compiled
models alike, batching in sizes each one accepts (docs/evaluation.md):

    fxpress.eval.perplexity(graph, Path("notes.txt"), tokenizer=model.tokenizer)
    fxpress.eval.accuracy(graph, "mnist-5k")
    fxpress.eval.mrr(encoder, model.tokenizer, "stdlib-docs")
    fxpress.eval.depth_rmse(graph, "motorcycle-depth")      # mm: lower is better (METRIC_GOAL)
    fxpress.eval.evaluate(model, graph, "text:notes.txt")   # a ZooModel's metric on a source
"""
from fxpress.eval.depth import depth_rmse
from fxpress.eval.evaluate import calibration_batches, check_evaluable, describe_data, evaluate, task_loss_for
from fxpress.eval.metrics import accuracy, mrr, perplexity, reciprocal_ranks
from fxpress.eval.retrieval import docs_mrr, docs_reciprocal_ranks
from fxpress.eval.sources import METRIC_GOAL, Source, load_text, metric_goal, parse_source, read_text_file
from fxpress.eval.stats import mean_ci, paired_bootstrap
from fxpress.utils.timing import Latency, measure_latency  # re-exported: latency is part of evaluation

__all__ = ["Latency", "METRIC_GOAL", "Source", "accuracy", "calibration_batches", "check_evaluable", "depth_rmse",
           "docs_mrr", "describe_data", "docs_reciprocal_ranks", "evaluate", "load_text", "mean_ci",
           "measure_latency", "metric_goal", "mrr", "paired_bootstrap", "parse_source", "perplexity",
           "read_text_file", "reciprocal_ranks", "task_loss_for"]
