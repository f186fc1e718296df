"""The MST regularizer, the fine-tuning loop, and the shipped regularized bnn-digits (acceptance)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fxpress
from fxpress.passes import PassManager
from fxpress.eval.evaluate import classification_accuracy
from fxpress.training.mst import (MSTFinetuneConfig, MSTRegularizer, binary_layers, finetune_mst,
                                          load_finetuned, output_positions)
from fxpress.zoo import BinaryDigitsNet, load_dataset, load_model

torch.set_num_threads(1)


@pytest.fixture()
def small_net():
    torch.manual_seed(0)
    return BinaryDigitsNet(width=8, hidden=16).eval()


def test_regularizer_equals_the_mst_bitops_fraction_for_hard_signs(small_net):
    layers = binary_layers(small_net)
    assert list(layers) == ["bconv1", "bconv2", "bfc"]
    positions = output_positions(small_net, layers, torch.rand(2, 1, 8, 8))
    assert positions == {"bconv1": 36, "bconv2": 16, "bfc": 1}
    regularizer = MSTRegularizer(layers, positions, sharpness=1e4)  # tanh saturates: soft signs are signs
    dense, mst = regularizer.bitops()
    keys = sum(positions[n] * m.weight[0].numel() for n, m in layers.items())
    assert dense == sum(positions[n] * m.weight.shape[0] * m.weight[0].numel() for n, m in layers.items())
    assert regularizer().detach().item() == pytest.approx((mst - keys) / dense, rel=1e-4)


def test_descending_the_regularizer_shrinks_the_true_mst(small_net):
    layers = binary_layers(small_net)
    regularizer = MSTRegularizer(layers, output_positions(small_net, layers, torch.rand(2, 1, 8, 8)))
    _, before = regularizer.bitops()
    optimizer = torch.optim.Adam([m.weight for m in layers.values()], lr=0.02)
    for step in range(30):
        if step % 5 == 0:
            regularizer.refresh()
        optimizer.zero_grad()
        regularizer().backward()
        optimizer.step()
    _, after = regularizer.bitops()
    assert after < 0.8 * before


def test_finetune_runs_and_keeps_signs_in_the_recovery_phase():
    model = copy.deepcopy(load_model("bnn-digits").module)
    train = load_dataset("digits", "train")
    subset = dataclasses.replace(train, images=train.images[:192], labels=train.labels[:192])
    config = MSTFinetuneConfig(epochs=2, recover_epochs=1, target_ratio=float("inf"), refresh_every=2)
    result = finetune_mst(model, subset, config)
    assert result.steps == 9 and len(result.history) == 3 and result.history[-1]["reg"] == 0.0
    assert result.mst_bitops_after < result.mst_bitops_before and result.ratio_after > result.ratio_before
    assert not model.training


def test_shipped_regularized_bnn_digits_meets_the_acceptance_bar():
    """>= 2x fewer bit-ops than dense binary at <= 1 point accuracy drop, measured through the passes."""
    base = load_model("bnn-digits")
    tuned, meta = load_finetuned()
    test = load_dataset("digits", "test")
    results = {}
    for name, module in (("base", base.module), ("tuned", tuned)):
        graph = fxpress.capture(module, base.example_inputs, dynamic=True)
        result = PassManager("binarize,xnor-mst").run(graph)
        results[name] = (classification_accuracy(result.graph, test), result.reports[1].stats["ratio"])
    base_accuracy, base_ratio = results["base"]
    tuned_accuracy, tuned_ratio = results["tuned"]
    assert base_accuracy == pytest.approx(meta["metrics"]["accuracy_before"], abs=1e-4)
    assert tuned_accuracy == pytest.approx(meta["metrics"]["accuracy"], abs=1e-4)
    assert tuned_ratio >= 2.0 and tuned_ratio > base_ratio
    assert base_accuracy - tuned_accuracy <= 0.01
