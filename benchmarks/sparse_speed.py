"""Dense vs sparse-kernels latency through eager, the native backend and TVM, at 1 thread.

    python benchmarks/sparse_speed.py [--quick] [--model minilm] [--sparsity 0.9] [--json PATH]

The CLI prunes every encoder linear of a zoo model to `sparsity` 4x1 blocks by magnitude (the
blocks with the smallest L1 norm are zeroed, `graph.masks` set), runs `sparse-kernels`, and prints
one row per path: dense ms, sparse ms, speedup, max abs error of sparse vs dense on the same path,
and the ratio of parameter bytes.  `measure(graph_dense, graph_sparse, inputs, rounds)` is the
timing itself, for other benchmarks (benchmarks/prune.py): thread CPU time per call, the median of
interleaved rounds (dense and sparse alternate, so machine noise hits both alike).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from fxpress import backends
from fxpress.ir import Graph, capture
from fxpress.passes import PassContext, PassManager
from fxpress.passes.sparsity import sparse_kernels  # noqa: F401  (registers the pass)
from fxpress.zoo import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.table import thread_ms  # noqa: E402

PATHS = ("eager", "native", "tvm")
TARGETS = {"native": "native", "tvm": "llvm"}


def _builds(graph: Graph, paths: tuple[str, ...]) -> dict[str, Callable]:
    built: dict[str, Callable] = {}
    for path in paths:
        if path == "eager":
            built[path] = graph.module
        else:
            compiled = backends.compile(graph, TARGETS[path])
            compiled.set_threads(1)
            built[path] = compiled
    return built


def measure(graph_dense: Graph, graph_sparse: Graph, inputs: tuple, rounds: int = 5,
            paths: tuple[str, ...] = PATHS, calls: int = 10) -> dict[str, Any]:
    """{path: {dense_ms, sparse_ms, speedup, max_abs_err}, param_bytes_dense, param_bytes_sparse, bytes_ratio}
    at 1 thread (torch's thread count is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        built = {"dense": _builds(graph_dense, paths), "sparse": _builds(graph_sparse, paths)}
        samples: dict[tuple[str, str], list[float]] = {(kind, path): [] for kind in built for path in paths}
        with torch.no_grad():
            for fns in built.values():
                for fn in fns.values():
                    fn(*inputs)
            for _ in range(rounds):
                for path in paths:
                    for kind in built:
                        samples[kind, path].append(thread_ms(built[kind][path], inputs, calls))
            result: dict[str, Any] = {}
            for path in paths:
                dense = statistics.median(samples["dense", path])
                sparse = statistics.median(samples["sparse", path])
                error = (built["sparse"][path](*inputs) - built["dense"][path](*inputs)).abs().max().item()
                result[path] = {"dense_ms": round(dense, 3), "sparse_ms": round(sparse, 3),
                                "speedup": round(dense / sparse, 2), "max_abs_err": float(f"{error:.3g}")}
    finally:
        torch.set_num_threads(threads)
    result["param_bytes_dense"] = graph_dense.param_bytes
    result["param_bytes_sparse"] = graph_sparse.param_bytes
    result["bytes_ratio"] = round(graph_sparse.param_bytes / graph_dense.param_bytes, 3)
    linear_bytes = [sum(t.numel() * t.element_size() for t in tensors) for tensors in (
        _linear_tensors(graph_dense, "weight"), _linear_tensors(graph_sparse, "weight_"))]
    result["linear_weight_bytes_ratio"] = round(linear_bytes[1] / max(1, linear_bytes[0]), 3)
    return result


def _linear_tensors(graph: Graph, leaf_prefix: str) -> list[torch.Tensor]:
    """The encoder linears' weight tensors: dense `weight`, or the sparse `weight_values` / indices."""
    return [tensor for name, tensor in graph.owned_tensors().items()
            if ".layer." in name and name.rpartition(".")[2].startswith(leaf_prefix)
            and (leaf_prefix != "weight" or tensor.dim() == 2)]


def block_prune(graph: Graph, sparsity: float, scope: str = ".layer.") -> Graph:
    """A copy with every linear weight under `scope` pruned to `sparsity` 4x1 blocks by L1 norm."""
    new = graph.copy()
    for node in new.fx.nodes:
        if node.target != torch.ops.aten.linear.default or node.args[1].op != "get_attr":
            continue
        path = str(node.args[1].target)
        weight = new.attribute(path)
        if scope not in f".{path}" or weight.shape[0] % 4:
            continue
        with torch.no_grad():
            norms = weight.abs().view(weight.shape[0] // 4, 4, -1).sum(1)
            kept = norms > norms.flatten().kthvalue(max(1, int(sparsity * norms.numel()))).values
            mask = kept.repeat_interleave(4, 0)
            weight.mul_(mask)
        new.masks[path] = mask
    return new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of 4x1 blocks zeroed")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    inputs = tuple(model.example_inputs)
    dense = capture(model.module, inputs, name=model.name)
    pruned = block_prune(dense, args.sparsity)
    run = PassManager("sparse-kernels").run(pruned, PassContext())
    stats = run.reports[0].stats
    print(f"{args.model}: {stats['replaced']} linears on sparse_linear "
          f"({', '.join(sorted({layer['form'] for layer in stats['layers'] if layer['chosen']}))})")
    result = measure(pruned, run.graph, inputs, rounds=3 if args.quick else 7,
                     paths=tuple(args.paths.split(",")))
    print(f"{'path':<8}{'dense ms':>10}{'sparse ms':>11}{'speedup':>9}{'max err':>10}")
    for path in args.paths.split(","):
        row = result[path]
        print(f"{path:<8}{row['dense_ms']:>10.3f}{row['sparse_ms']:>11.3f}{row['speedup']:>9.2f}"
              f"{row['max_abs_err']:>10.2g}")
    print(f"param bytes: {result['param_bytes_sparse']} / {result['param_bytes_dense']} = {result['bytes_ratio']}; "
          f"encoder linear weights: {result['linear_weight_bytes_ratio']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result | {"stats": stats}, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
