"""The manifest's description of a graph's quantized layers: which params entries hold their planes.

    "quantized": {
      "model.layers.0.mlp.up_proj.weight": {
        "ops": ["linear"], "bits": 4, "group": 32, "zero": "int", "in_features": 64, "out_features": 128,
        "planes": {"codes":  {"name": "buffer:model.layers.0.mlp.up_proj.weight_codes",  "dtype": "uint8",
                              "shape": [128, 32]},
                   "scales": {...float32 [128, 2]}, "zeros": {...uint8 [128, 2]}}}}

A layer is the packed weight (named after its codes tensor, less `_codes`); a weight read by several
ops (a tied embedding and head) is one layer.  `fxpress.backends.artifact_check.check_quantized`
checks the records and the saved planes against each other at load.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from fxpress.ir.graph import Graph
from fxpress.ops.quant import QUANTIZED_EMBEDDING, QUANTIZED_OPS

log = logging.getLogger(__name__)

PLANES = ("codes", "scales", "zeros", "codebook")
KINDS = ("parameter", "buffer", "constant")


def _plane_key(node: object, tensors: dict[str, np.ndarray]) -> str | None:
    """The params key of a plane read by a get_attr node (None: not a plain attribute)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    return next((f"{kind}:{node.target}" for kind in KINDS if f"{kind}:{node.target}" in tensors), None)


def describe_quantized(graph: Graph, tensors: dict[str, np.ndarray]) -> dict[str, dict]:
    """One record per packed weight of `graph`'s quantized ops whose planes are saved in `tensors`."""
    layers: dict[str, dict] = {}
    for node in graph.fx.nodes:
        if node.op != "call_function" or node.target not in QUANTIZED_OPS:
            continue
        embedding = node.target == QUANTIZED_EMBEDDING
        keys = dict(zip(PLANES, (_plane_key(arg, tensors) for arg in node.args[1:5])))
        if keys["codes"] is None or keys["scales"] is None or any(
                arg is not None and keys[name] is None for name, arg in zip(PLANES, node.args[1:5])):
            log.info("native: %s reads planes that are not saved attributes; not described", node.name)
            continue
        layer = keys["codes"].partition(":")[2].removesuffix("_codes")
        bits, group = (node.args[5], node.args[6]) if embedding else (node.args[6], node.args[7])
        in_features = int(node.args[7]) if embedding else int(graph.info(node.args[0]).shape[-1])
        zeros = tensors[keys["zeros"]] if keys["zeros"] else None
        record = layers.setdefault(layer, {
            "ops": [], "bits": int(bits), "group": int(group),
            "zero": "sym" if zeros is None else "int" if zeros.dtype == np.uint8 else "float",
            "in_features": in_features, "out_features": int(tensors[keys["codes"]].shape[0]),
            "planes": {name: {"name": key, "dtype": str(tensors[key].dtype), "shape": list(tensors[key].shape)}
                       for name, key in keys.items() if key is not None}})
        kind = "embedding" if embedding else "linear"
        if kind not in record["ops"]:
            record["ops"].append(kind)
    return layers


__all__ = ["PLANES", "describe_quantized"]
