"""Passes compose: after any structural pass, every other one does its work (or says precisely why not).

Each ordered pair runs through the manager with verification after every pass (FX lint, metadata,
provenance of every inserted node, export metadata consistent with NodeInfo), and the second pass's
report must show that it changed the graph, with the stats that say what it did.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fxpress
from fxpress.errors import PreconditionError
from fxpress.ir.builder import origin
from fxpress.passes import PassContext, PassManager, VerifyAfterPass
from model_factories import tiny_llama, token_batches

torch.set_num_threads(1)

# What each pass's stats show when it did its work.
DID_WORK = {
    "merge-tokens{r=4}": lambda s: s["tokens_out"] < 50 and s["macs_after"] < s["macs_before"],
    "remove-layers{count=1}": lambda s: len(s["removed"]) == 1,
    # after quantize the shared weights are packed buffers: bytes shrink, float parameters may not
    "share-weights{group=2}": lambda s: s["unique_params"] < s["unique_params_before"] or
    s["bytes_after"] < s["bytes_before"],
    "binarize": lambda s: len(s["binarized"]) > 0,
    "binarize,xnor-mst": lambda s: s["mst_bitops_per_sample"] < s["dense_bitops_per_sample"],
    "distill{steps=2,lr=1e-3}": lambda s: s["steps"] == 2 and s["trained_params"] > 0,
    "prune-width{heads=2,mlp=64}": lambda s: s["removed_params"] > 0 and
    all(e == {"heads": "4->2", "mlp": "128->64", "removed_heads": e["removed_heads"]} for e in s["layers"].values()),
    "prune-width{heads=2,mlp=32}": lambda s: s["removed_params"] > 0 and
    all(e["heads"] == "4->2" and e["mlp"] == "64->32" for e in s["layers"].values()),
    "prune-obs{sparsity=0.5,score=magnitude}": lambda s: abs(s["sparsity"] - 0.5) < 0.01 and s["layers"],
    "quantize{bits=4}": lambda s: s["quantized"] > 0 and s["bits_per_weight"] == 4 + 64 / 32,  # + scale, offset
    # group=16: after prune-width{heads=2} an o_proj has K = 2 heads x 8 = 16 input features
    "quantize{bits=4,group=16}": lambda s: s["quantized"] > 0 and s["bits_per_weight"] == 4 + 64 / 16,
    # one training step each: the same packed form as quantize (diff-quant adds a 4-level codebook per layer)
    "quantized-distill{bits=4,steps=1}": lambda s: s["quantized"] > 0 and s["steps"] == 1 and
    s["bits_per_weight"] == 4 + 64 / 32,
    "quantized-distill{bits=4,group=16,steps=1}": lambda s: s["quantized"] > 0 and s["steps"] == 1 and
    s["bits_per_weight"] == 4 + 64 / 16,
    "diff-quant{bits=2,steps=1}": lambda s: s["quantized"] > 0 and s["method"] == "diff-quant" and
    all(len(e["codebook"]) == 4 for e in s["per_layer"].values()),
    "diff-quant{bits=2,group=16,steps=1}": lambda s: s["quantized"] > 0 and s["method"] == "diff-quant" and
    all(len(e["codebook"]) == 4 for e in s["per_layer"].values()),
    # rank 32 (ViT, dim 64) and 16 (tiny LLaMA, dim 32): factors whose K a quantize group divides
    "low-rank{rank=32}": lambda s: len(s["factorized"]) > 0 and s["params_after"] < s["params_before"],
    "low-rank{rank=16,min_gain=0}": lambda s: len(s["factorized"]) > 0 and s["params_after"] <= s["params_before"],
}
VIT_PASSES = ["merge-tokens{r=4}", "remove-layers{count=1}", "share-weights{group=2}", "binarize",
              "binarize,xnor-mst", "prune-width{heads=2,mlp=64}", "quantize{bits=4}", "low-rank{rank=32}"]
LLAMA_PASSES = ["remove-layers{count=1}", "share-weights{group=2}", "distill{steps=2,lr=1e-3}",
                "prune-width{heads=2,mlp=32}", "prune-obs{sparsity=0.5,score=magnitude}", "quantize{bits=4,group=16}",
                "low-rank{rank=16,min_gain=0}"]


@pytest.fixture(scope="module")
def vit(zoo_model):
    model = zoo_model("vit-mnist")
    return model.module, fxpress.capture(model.module, model.example_inputs), model.example_inputs


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(layers=4)
    batches = token_batches(2)
    return model, fxpress.capture(model, batches[0]), batches


def run_pair(first: str, second: str, teacher, graph, batches):
    ctx = PassContext(teacher=teacher, calibration=list(batches))
    return PassManager(f"{first},{second}", [VerifyAfterPass()]).run(graph, ctx)


def check_second_did_work(result, second: str) -> None:
    last = result.reports[-1]
    assert last.modified, (second, last.stats.get("reason"))
    assert DID_WORK[second](last.stats), (second, last.stats)
    for node in result.graph.fx.nodes:
        if node.op == "call_function":
            assert origin(node) is not None, node.format_node()


# Orders that cannot work say so precisely, before doing anything.
REFUSED = {("binarize,xnor-mst", "share-weights{group=2}"): "run share-weights before xnor-mst",
           ("binarize", "prune-width{heads=2,mlp=64}"): "op fxpress.binary_linear.default has no coupling rule",
           ("binarize,xnor-mst", "prune-width{heads=2,mlp=64}"): "has no coupling rule",
           ("quantize{bits=4}", "prune-width{heads=2,mlp=64}"): "op fxpress.quantized_linear.default has no coupling",
           ("quantize{bits=4}", "binarize"): "layers are quantized .*run it before quantize",
           ("quantize{bits=4}", "binarize,xnor-mst"): "layers are quantized .*run it before quantize",
           ("binarize", "quantize{bits=4}"): "no float linear left to quantize: .* fxpress.binary_linear",
           ("binarize,xnor-mst", "quantize{bits=4}"): "no float linear left to quantize: .* fxpress.binary_linear_mst",
           ("binarize", "low-rank{rank=32}"): "no float linear or conv2d left to factorize: .* fxpress.binary_linear",
           ("binarize,xnor-mst", "low-rank{rank=32}"): "no float linear or conv2d left to factorize: .* fxpress.binary",
           ("quantize{bits=4}", "low-rank{rank=32}"): "no float linear or conv2d left to factorize: .*quantized_linear",
           # low-rank's bottleneck reads as the MLP width: prune width first, then factorize
           ("low-rank{rank=32}", "prune-width{heads=2,mlp=64}"): "mlp keep count 64 exceeds the 32 units"}
LLAMA_REFUSED = {
    ("quantize{bits=4,group=16}", "prune-width{heads=2,mlp=32}"): "op fxpress.quantized_linear.default has no coupling",
    ("quantize{bits=4,group=16}", "prune-obs{sparsity=0.5,score=magnitude}"): "layers are quantized .*prune before",
    ("quantize{bits=4,group=16}", "low-rank{rank=16,min_gain=0}"): "no float linear or conv2d left to factorize",
    ("low-rank{rank=16,min_gain=0}", "prune-width{heads=2,mlp=32}"): "mlp keep count 32 exceeds the 16 units"}


# The trained quantizers (one step each; a full permutation of them would cost minutes): after each
# structural pass, before a few, and the orders they refuse.  They need and leave what quantize does.
QD, DQ = "quantized-distill{bits=4,steps=1}", "diff-quant{bits=2,steps=1}"
QD16, DQ16 = "quantized-distill{bits=4,group=16,steps=1}", "diff-quant{bits=2,group=16,steps=1}"
TRAINED_VIT_PAIRS = [(first, second) for first in ("merge-tokens{r=4}", "remove-layers{count=1}",
                                                   "share-weights{group=2}", "prune-width{heads=2,mlp=64}")
                     for second in (QD, DQ)] + [(QD, "remove-layers{count=1}"), (DQ, "share-weights{group=2}")]
TRAINED_LLAMA_PAIRS = [(first, QD16) for first in LLAMA_PASSES[:5]] + \
    [("remove-layers{count=1}", DQ16), ("prune-width{heads=2,mlp=32}", DQ16), (QD16, "distill{steps=2,lr=1e-3}")]
ALREADY = r"the graph already has \d+ quantized linears .*run it instead of quantize"
TRAINED_REFUSED = {("quantize{bits=4}", QD): ALREADY, ("quantize{bits=4}", DQ): ALREADY, (QD, DQ): ALREADY,
                   ("binarize", QD): "no float linear left to quantize: .* fxpress.binary_linear",
                   (QD, "prune-width{heads=2,mlp=64}"): "op fxpress.quantized_linear.default has no coupling",
                   (DQ, "binarize"): "layers are quantized .*run it before quantize"}


@pytest.mark.parametrize("first,second", [p for p in itertools.permutations(VIT_PASSES, 2)
                                          if not (p[0].startswith("binarize") and p[1].startswith("binarize"))
                                          and p not in REFUSED])
def test_every_ordered_pair_on_vit_mnist(vit, first, second):
    module, graph, inputs = vit
    result = run_pair(first, second, module, graph, [inputs])
    assert all(report.modified for report in result.reports)
    check_second_did_work(result, second)


@pytest.mark.parametrize("first,second", [p for p in itertools.permutations(LLAMA_PASSES, 2) if p not in LLAMA_REFUSED])
def test_every_ordered_pair_of_depth_passes_on_tiny_llama(llama, first, second):
    model, graph, batches = llama
    result = run_pair(first, second, model, graph, batches)
    check_second_did_work(result, second)


@pytest.mark.parametrize("first,second", TRAINED_VIT_PAIRS)
def test_trained_quantizers_compose_on_vit_mnist(vit, first, second):
    module, graph, inputs = vit
    check_second_did_work(run_pair(first, second, module, graph, [inputs]), second)


@pytest.mark.parametrize("first,second", TRAINED_LLAMA_PAIRS)
def test_trained_quantizers_compose_on_tiny_llama(llama, first, second):
    model, graph, batches = llama
    check_second_did_work(run_pair(first, second, model, graph, batches), second)


@pytest.mark.parametrize("first,second", list(TRAINED_REFUSED))
def test_orders_the_trained_quantizers_cannot_do_say_why(vit, first, second):
    module, graph, inputs = vit
    with pytest.raises(PreconditionError, match=TRAINED_REFUSED[first, second]):
        run_pair(first, second, module, graph, [inputs])


@pytest.mark.parametrize("first,second", list(REFUSED))
def test_orders_that_cannot_work_say_why(vit, first, second):
    module, graph, inputs = vit
    with pytest.raises(PreconditionError, match=REFUSED[first, second]):
        run_pair(first, second, module, graph, [inputs])


@pytest.mark.parametrize("first,second", list(LLAMA_REFUSED))
def test_orders_that_cannot_work_on_tiny_llama_say_why(llama, first, second):
    model, graph, batches = llama
    with pytest.raises(PreconditionError, match=LLAMA_REFUSED[first, second]):
        run_pair(first, second, model, graph, batches)


def test_distill_after_merge_trains_through_the_merge(vit):
    module, graph, inputs = vit
    result = run_pair("merge-tokens{r=4}", "distill{steps=4,lr=1e-4}", module, graph, [inputs])
    stats = result.reports[-1].stats
    assert stats["loss_last"] < 0.6 * stats["loss_first"]  # measured: 0.0047 -> 0.0020


def test_a_pass_with_nothing_left_to_do_says_why(vit):
    module, graph, inputs = vit
    result = PassManager("binarize,binarize").run(graph, PassContext())
    assert not result.reports[1].modified and "no float linear/conv2d layer left" in result.reports[1].stats["reason"]


@pytest.mark.parametrize("first", [QD, DQ])
def test_quantize_after_a_trained_quantizer_has_nothing_left(vit, first):
    module, graph, inputs = vit
    result = run_pair(first, "quantize{bits=4}", module, graph, [inputs])
    assert not result.reports[1].modified and "already quantized" in result.reports[1].stats["reason"]


def test_a_precondition_failure_names_the_passes_before_it(vit):
    module, graph, inputs = vit
    with pytest.raises(PreconditionError) as failed:
        PassManager("merge-tokens{r=4},remove-layers{count=1},merge-tokens{r=2}").run(graph, PassContext())
    error = failed.value
    assert error.pass_name == "merge-tokens" and len(error.ran_before) == 2
    assert "already has" in str(error) and "passes run before it: merge-tokens{r=4," in str(error)
    with pytest.raises(PreconditionError, match=r"needs a teacher.*passes run before it: remove-layers"):
        PassManager("remove-layers{count=1},distill").run(graph, PassContext(calibration=[inputs]))


def test_analyses_are_computed_once_and_carried_across_a_pass_that_preserves_them(llama):
    """distill keeps the block structure and says so; remove-layers after it reuses the block stack."""
    model, graph, batches = llama
    ctx = PassContext(teacher=model, calibration=list(batches))
    result = PassManager("distill{steps=1},remove-layers{count=1,metric=last}").run(graph, ctx)
    assert [r.modified for r in result.reports] == [True, True]
    assert ctx.analyses.computed == {"main-block-stack": 1}
