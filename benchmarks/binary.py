"""Binary kernels and MST channel reuse, measured side by side in one run.

    python benchmarks/binary.py [--quick] [--use-fixture] --json PATH

Kernels (1 thread, batch 64): the dense binary GEMM (activation packing +
XNOR-popcount, weights packed beforehand) against fp32 `x @ W.T`, and the
MST reuse kernel against the dense binary kernel, for K in {512, 1024, 4096}
and N in {256, 1024} on random weights, then on the binary layers of
bnn-digits (plain and MST-regularized; whole layers including im2col, fp32
reference = float conv / linear on the signs).  Each kernel row names the
popcount path that ran (`simd`: avx512-vpopcntdq, avx2 or scalar; see
`kernels.simd_level()`).  Times are medians of
interleaved rounds; ratios > 1 mean the first-named kernel is slower.

Network: bnn-digits accuracy on the held-out split and bit-ops per image
for `dense` (binarize), `mst` (binarize,xnor-mst) and `mst_regularized`
(fine-tuned here with the MST regularizer, or the shipped fixture with
--use-fixture), evaluated on the native kernels (checked equal to the graph).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxpress  # noqa: E402
from fxpress.backends.native import kernels, run_native  # noqa: E402
from fxpress.backends.native.lowering import NativeBinaryLayer  # noqa: E402
from fxpress.passes import PassManager  # noqa: E402
from fxpress.ops.binary import binary_sign, pack_weight  # noqa: E402
from fxpress.passes.binary.xnor_mst import plan_layer  # noqa: E402
from fxpress.eval.evaluate import classification_accuracy  # noqa: E402
from fxpress.training.mst import binary_layers, finetune_mst, load_finetuned  # noqa: E402
from fxpress.utils.timing import interleaved_latency  # noqa: E402
from fxpress.zoo import load_dataset, load_model  # noqa: E402

BATCH = 64
SHAPES = [(k, n) for k in (512, 1024, 4096) for n in (256, 1024)]


def timed(fns: dict, inputs: tuple, quick: bool) -> dict[str, float]:
    """Median ms of each callable, measured in interleaved rounds."""
    rounds, budget = (3, 0.15) if quick else (7, 0.4)
    measured = interleaved_latency(fns, inputs, rounds=rounds, budget_s=budget)
    return {name: latency.median_ms for name, latency in measured.items()}


def gemm_row(k: int, n: int, quick: bool) -> dict:
    """fp32 matmul vs dense binary GEMM vs MST reuse for one (K, N) on random weights."""
    generator = torch.Generator().manual_seed(k * 7 + n)
    x, w = torch.randn(BATCH, k, generator=generator), torch.randn(n, k, generator=generator)
    start = time.perf_counter()
    plan, tree_weight, _, depth = plan_layer(w)
    plan_s = time.perf_counter() - start
    dense = NativeBinaryLayer.dense(w)
    mst = NativeBinaryLayer.mst(pack_weight(w), plan.to_tensor())
    assert torch.equal(dense(x), binary_sign(x) @ binary_sign(w).T) and torch.equal(mst(x), dense(x))
    wt = w.T.contiguous()
    times = timed({"fp32": lambda a: a @ wt, "dense": dense, "mst": mst}, (x,), quick)
    return {"layer": "random", "simd": kernels.simd_level(), "K": k, "N": n, "batch": BATCH,
            "fp32_ms": times["fp32"], "dense_ms": times["dense"],
            "mst_ms": times["mst"], "speedup_vs_fp32": times["fp32"] / times["dense"],
            "mst_vs_dense": times["dense"] / times["mst"], "bitops_ratio": n * k / (k + tree_weight),
            "depth": depth, "plan_s": plan_s}


def layer_inputs(module: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every binary layer of `module` on `images`."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0].detach()))
             for name, layer in binary_layers(module).items()]
    with torch.no_grad():
        module(images)
    for hook in hooks:
        hook.remove()
    return seen


def trained_layer_rows(variant: str, module: torch.nn.Module, images: torch.Tensor, quick: bool) -> list[dict]:
    """Dense vs MST native layers (and a float conv / linear on the signs) for each binary layer."""
    rows, inputs = [], layer_inputs(module, images)
    for name, layer in binary_layers(module).items():
        weight = layer.weight.detach()
        plan, tree_weight, _, depth = plan_layer(weight)
        conv = (tuple(weight.shape[2:]), layer.stride, layer.padding, layer.dilation) if weight.dim() == 4 else None
        k = weight[0].numel()
        dense = NativeBinaryLayer.dense(weight, conv=conv)
        mst = NativeBinaryLayer.mst(pack_weight(weight), plan.to_tensor(), conv=conv)
        signs = binary_sign(weight)
        fp32 = (lambda a: F.conv2d(binary_sign(a), signs)) if conv else (lambda a: F.linear(binary_sign(a), signs))
        x = inputs[name]
        assert torch.equal(dense(x), fp32(x)) and torch.equal(mst(x), fp32(x))
        times = timed({"fp32": fp32, "dense": dense, "mst": mst}, (x,), quick)
        rows.append({"layer": f"bnn-digits.{name}", "variant": variant, "simd": kernels.simd_level(),
                     "K": k, "N": weight.shape[0],
                     "batch": images.shape[0], "fp32_ms": times["fp32"], "dense_ms": times["dense"],
                     "mst_ms": times["mst"], "speedup_vs_fp32": times["fp32"] / times["dense"],
                     "mst_vs_dense": times["dense"] / times["mst"],
                     "bitops_ratio": weight.shape[0] * k / (k + tree_weight), "depth": depth})
    return rows


def network_rows(base_module: torch.nn.Module, tuned: torch.nn.Module, example: tuple) -> list[dict]:
    """Accuracy (native kernels, checked equal to the graph) and bit-ops per image of each variant."""
    test = load_dataset("digits", "test")
    rows = []
    for variant, module, pipeline in (("dense", base_module, "binarize"), ("mst", base_module, "binarize,xnor-mst"),
                                      ("mst_regularized", tuned, "binarize,xnor-mst")):
        graph = fxpress.capture(module, example, dynamic=True)
        result = PassManager(pipeline).run(graph)
        program = run_native(result.graph)
        assert torch.equal(program(test.images[:64]), result.graph(test.images[:64]))
        stats = PassManager("xnor-mst").run(PassManager("binarize").run(graph).graph).reports[0].stats
        bitops = stats["dense_bitops_per_sample"] if variant == "dense" else stats["mst_bitops_per_sample"]
        rows.append({"variant": variant, "accuracy": classification_accuracy(program, test), "bitops": bitops,
                     "ratio_vs_dense": stats["dense_bitops_per_sample"] / bitops})
    return rows


def regularized(base, use_fixture: bool) -> tuple[torch.nn.Module, dict]:
    if use_fixture:
        module, meta = load_finetuned()
        return module, {"source": "fixture bnn-digits-mst", "seconds": meta["seconds"]}
    module = copy.deepcopy(base.module)
    result = finetune_mst(module, load_dataset("digits", "train"))
    return module, {"source": "fine-tuned in this run", "seconds": round(result.seconds, 1)}


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print("  ".join(f"{c:>15}" for c in columns))
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        print("  ".join(f"{c:>15.3f}" if isinstance(c, float) else f"{str(c):>15}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds (about a minute)")
    parser.add_argument("--use-fixture", action="store_true", help="take the shipped fine-tuned model")
    parser.add_argument("--json", type=Path, help="write {kernels, network} here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"native kernels: {kernels.simd_level()}, torch threads: {torch.get_num_threads()}")
    base = load_model("bnn-digits")
    tuned, tuning = regularized(base, args.use_fixture)
    print(f"mst_regularized: {tuning['source']} ({tuning['seconds']} s)")
    kernel_rows = [gemm_row(k, n, args.quick) for k, n in SHAPES]
    images = load_dataset("digits", "test").images[:BATCH]
    for variant, module in (("mst", base.module), ("mst_regularized", tuned)):
        kernel_rows += trained_layer_rows(variant, module, images, args.quick)
    network = network_rows(base.module, tuned, base.example_inputs)
    print_table("kernels (ms are medians; speedup_vs_fp32 = fp32 / dense binary; mst_vs_dense = dense / mst)",
                kernel_rows, ["layer", "variant", "simd", "K", "N", "batch", "fp32_ms", "dense_ms", "mst_ms",
                              "speedup_vs_fp32", "mst_vs_dense", "bitops_ratio", "depth"])
    print_table("network: bnn-digits (held-out accuracy, bit-ops per image)", network,
                ["variant", "accuracy", "bitops", "ratio_vs_dense"])
    at_4096 = [row["speedup_vs_fp32"] for row in kernel_rows if row["layer"] == "random" and row["K"] == 4096]
    print(f"\ndense binary GEMM ({kernels.simd_level()}) vs fp32 at K=4096: "
          f"{min(at_4096):.1f}x .. {max(at_4096):.1f}x (acceptance: >= 4x); total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"simd": kernels.simd_level(), "kernels": kernel_rows, "network": network,
                                         "finetune": tuning}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
