"""fold-constants and fuse-batchnorm: structure before/after, numerics, purity, stats, pipelines."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress.ir.graph import Graph
from fxpress.ir.verify import verify
from fxpress.passes import NumericCheck, PassContext, PassManager, VerifyAfterPass
from fxpress.passes.cleanup.fold_constants import FoldConstants
from fxpress.passes.cleanup.fuse_batchnorm import FuseBatchNorm
from model_factories import (ConstantSubgraph, Conv1dBn, ConvBnRelu, LargeExpand, LinearBn1d, MutatedBuffer,
                             NoisyBuffer, PlainMlp, SequenceLinearBn, SharedConv, randomize_batchnorm,
                             snapshot, unchanged)

torch.set_num_threads(1)

METHODS = ["export", "symbolic_trace"]
CTX = PassContext()


def _capture(model: nn.Module, inputs: tuple, method: str = "export") -> Graph:
    return fxpress.capture(model, inputs, method=method)


def _ops(graph: Graph) -> list[str]:
    """Op names (call_function) and module class names (call_module) in graph order."""
    names = []
    for node in graph.fx.nodes:
        if node.op == "call_function":
            names.append(getattr(node.target, "__name__", str(node.target)).split(".")[0])
        elif node.op == "call_method":
            names.append(str(node.target))
        elif node.op == "call_module":
            names.append(type(graph.attribute(str(node.target))).__name__)
    return names


def _bn_model(cls, seed: int = 0) -> nn.Module:
    return randomize_batchnorm(cls(), seed).eval()


CONV_INPUT = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)
LINEAR_INPUT = (torch.randn(4, 6, generator=torch.Generator().manual_seed(2)),)
MLP_INPUT = (torch.randn(3, 8, generator=torch.Generator().manual_seed(3)),)


# -- fold-constants ---------------------------------------------------------------------------
def test_fold_constants_replaces_buffer_subgraphs_with_folded_buffers():
    model = ConstantSubgraph().eval()
    graph = _capture(model, MLP_INPUT)
    assert {"exp", "arange", "sub"} <= set(_ops(graph))
    result = FoldConstants()(graph, CTX)
    assert result.modified
    ops = _ops(result.graph)
    assert not {"exp", "arange", "sub"} & set(ops)
    assert "t" in ops  # reads a parameter: not folded by default
    folded = {str(n.target) for n in result.graph.fx.nodes if n.op == "get_attr"
              and str(n.target).startswith("_folded.")}
    assert folded == set(result.stats["new_constants"]) == {"_folded.mul", "_folded.sub"}
    assert result.stats["new_constant_bytes"] == 2 * 8 * 4
    assert sorted(result.stats["removed_attributes"]) == ["log_scale", "offset"]
    assert result.graph.num_params == graph.num_params
    verify(result.graph)


@pytest.mark.parametrize("method", METHODS)
def test_fold_constants_is_bit_identical_and_leaves_input_alone(method):
    model = ConstantSubgraph().eval()
    before = snapshot(model)
    graph = _capture(model, MLP_INPUT, method)
    code = graph.module.code
    result = FoldConstants(fold_params=True)(graph, CTX)
    assert result.modified
    assert torch.equal(result.graph(*MLP_INPUT), model(*MLP_INPUT).detach())
    assert graph.module.code == code and torch.equal(graph(*MLP_INPUT), model(*MLP_INPUT).detach())
    assert unchanged(model, before)


def test_fold_params_freezes_a_transposed_weight():
    graph = _capture(ConstantSubgraph().eval(), MLP_INPUT)
    plain = FoldConstants()(graph, CTX).graph
    frozen = FoldConstants(fold_params=True)(graph, CTX)
    assert "t" in _ops(plain) and "t" not in _ops(frozen.graph)
    assert "_folded.sum_1" in frozen.stats["new_constants"]
    assert frozen.graph.num_params == plain.num_params  # fc.weight is still read by linear
    assert not isinstance(frozen.graph.attribute("_folded.sum_1"), nn.Parameter)


@pytest.mark.parametrize("model", [PlainMlp(), ConstantSubgraph()], ids=["nothing", "second-run"])
def test_fold_constants_unmodified_when_nothing_to_fold(model):
    graph = _capture(model.eval(), MLP_INPUT)
    if isinstance(model, ConstantSubgraph):
        graph = FoldConstants()(graph, CTX).graph
    result = FoldConstants()(graph, CTX)
    assert not result.modified and result.graph is graph
    assert result.stats["folded_nodes"] == 0


def test_fold_constants_skips_values_far_larger_than_their_inputs():
    graph = _capture(LargeExpand(), (torch.randn(512, 1000),))
    kept = FoldConstants()(graph, CTX)
    assert not kept.modified and kept.stats["skipped_large"] == ["expand"]
    folded = FoldConstants(max_growth=1000.0)(graph, CTX)
    assert folded.modified and "expand" not in _ops(folded.graph)
    assert folded.stats["new_constant_bytes"] == 512 * 1000 * 4


def test_fold_constants_never_folds_random_ops_or_written_buffers():
    noisy = FoldConstants()(_capture(NoisyBuffer(), (torch.randn(4),)), CTX)
    assert _ops(noisy.graph) == ["rand_like", "mul", "add", "add"]
    assert noisy.stats["new_constants"] == ["_folded.mul_1"]  # base * 3.0 only
    mutated = _capture(MutatedBuffer(), (torch.randn(4),))
    assert not FoldConstants()(mutated, CTX).modified


def test_fold_constants_folds_rotary_tables_of_a_decoder():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = transformers.LlamaModel(config)

        def forward(self, ids):
            return self.model(ids, use_cache=False).last_hidden_state

    model = Decoder().eval()
    ids = (torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0)),)
    graph = _capture(model, ids)
    assert {"cos", "sin", "arange"} <= set(_ops(graph))
    result = FoldConstants()(graph, CTX)
    assert not {"cos", "sin"} & set(_ops(result.graph))
    assert "model.rotary_emb.inv_freq" in result.stats["removed_attributes"]
    assert result.stats["dropped_asserts"] > 0
    assert torch.equal(result.graph(*ids), model(*ids))
    verify(result.graph)
    cleaned = PassManager("dce").run(result.graph).graph  # dead position ids the trace left behind
    assert "arange" not in _ops(cleaned)


# -- fuse-batchnorm ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_fuse_batchnorm_conv_structure_and_numerics(method):
    model = _bn_model(ConvBnRelu)
    before = snapshot(model)
    graph = _capture(model, CONV_INPUT, method)
    code = graph.module.code
    result = FuseBatchNorm()(graph, CTX)
    assert result.modified
    ops = _ops(result.graph)
    assert not any("batch_norm" in op or "BatchNorm" in op for op in ops)
    convs = [op for op in _ops(graph) if "conv" in op.lower()]
    assert [op for op in ops if "conv" in op.lower()] == convs and len(convs) == 2
    assert result.stats == {"fused_pairs": ["conv1 + bn1", "conv2 + bn2"],
                            "removed_nodes": graph.num_nodes - result.graph.num_nodes}
    torch.testing.assert_close(result.graph(*CONV_INPUT), model(*CONV_INPUT).detach(), rtol=1e-5, atol=1e-5)
    assert graph.module.code == code and unchanged(model, before)
    assert result.graph.num_params < graph.num_params
    verify(result.graph)


@pytest.mark.parametrize("method", METHODS)
def test_fuse_batchnorm_linear_bn1d_adds_missing_bias(method):
    model = _bn_model(LinearBn1d, seed=1)
    before = snapshot(model)
    graph = _capture(model, LINEAR_INPUT, method)
    result = FuseBatchNorm()(graph, CTX)
    assert result.stats["fused_pairs"] == ["fc1 + bn1", "fc2 + bn2"]
    assert not any("batch_norm" in op or "BatchNorm" in op for op in _ops(result.graph))
    biases = [t for name, t in result.graph.referenced_tensors().items() if "bias" in name]
    assert len(biases) == 2 and all(isinstance(b, nn.Parameter) for b in biases)
    torch.testing.assert_close(result.graph(*LINEAR_INPUT), model(*LINEAR_INPUT).detach(),
                               rtol=1e-5, atol=1e-5)
    assert unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_fuse_batchnorm_conv1d_and_depthwise(method):
    model = _bn_model(Conv1dBn, seed=2)
    inputs = (torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(4)),)
    result = FuseBatchNorm()(_capture(model, inputs, method), CTX)
    assert result.stats["fused_pairs"] == ["conv + bn", "depthwise + bn2d"]
    torch.testing.assert_close(result.graph(*inputs), model(*inputs).detach(), rtol=1e-5, atol=1e-5)


def test_fuse_batchnorm_on_decomposed_export_graph():
    model = _bn_model(ConvBnRelu)
    program = torch.export.export(model, CONV_INPUT, strict=False).run_decompositions()
    graph = Graph(program.module(), CONV_INPUT, name="decomposed").annotate()
    assert "_native_batch_norm_legit_no_training" in _ops(graph)
    result = FuseBatchNorm()(graph, CTX)
    assert result.stats["fused_pairs"] == ["conv1 + bn1", "conv2 + bn2"]
    assert not any("batch_norm" in op for op in _ops(result.graph))
    assert _ops(result.graph).count("convolution") == 2
    torch.testing.assert_close(result.graph(*CONV_INPUT), model(*CONV_INPUT).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_fuse_batchnorm_leaves_unfusable_patterns(method):
    shared = _capture(_bn_model(SharedConv), CONV_INPUT, method)
    assert not FuseBatchNorm()(shared, CTX).modified
    with pytest.warns(UserWarning, match="in training mode: 2 dropout/batch-norm modules"):
        training = _capture(randomize_batchnorm(ConvBnRelu()).train(), CONV_INPUT, method)
    assert not FuseBatchNorm()(training, CTX).modified
    sequence = _capture(_bn_model(SequenceLinearBn), (torch.randn(2, 4, 4),), method)
    assert not FuseBatchNorm()(sequence, CTX).modified
    plain = _capture(PlainMlp().eval(), MLP_INPUT, method)
    result = FuseBatchNorm()(plain, CTX)
    assert not result.modified and result.graph is plain and result.stats["fused_pairs"] == []


@pytest.mark.parametrize("method", METHODS)
def test_fuse_batchnorm_second_run_does_nothing(method):
    graph = _capture(_bn_model(ConvBnRelu), CONV_INPUT, method)
    fused = FuseBatchNorm()(graph, CTX).graph
    again = FuseBatchNorm()(fused, CTX)
    assert not again.modified and again.graph is fused


def test_fuse_batchnorm_keeps_a_module_other_nodes_read():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x)) + self.fc.weight.sum(0)

    model = randomize_batchnorm(ReadsWeight()).eval()
    inputs = (torch.randn(3, 4),)
    result = FuseBatchNorm()(_capture(model, inputs, "symbolic_trace"), CTX)
    assert "fc_fused" in {str(n.target) for n in result.graph.fx.nodes if n.op == "call_module"}
    torch.testing.assert_close(result.graph(*inputs), model(*inputs).detach(), rtol=1e-5, atol=1e-5)


# -- through the pass manager ------------------------------------------------------------------
PIPELINE_CASES = [(ConstantSubgraph, MLP_INPUT), (ConvBnRelu, CONV_INPUT), (LinearBn1d, LINEAR_INPUT)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("factory,inputs", PIPELINE_CASES, ids=[c[0].__name__ for c in PIPELINE_CASES])
def test_cleanup_pipeline_with_instruments(factory, inputs, method):
    model = _bn_model(factory)
    before = snapshot(model)
    graph = _capture(model, inputs, method)
    manager = PassManager("fold-constants,fuse-batchnorm,dce", [VerifyAfterPass(), NumericCheck()])
    result = manager.run(graph, PassContext(calibration=[inputs]))
    # symbolic_trace already computed the buffer expressions into _tensor_constant attributes
    assert result.modified or (factory is ConstantSubgraph and method == "symbolic_trace")
    torch.testing.assert_close(result.graph(*inputs), model(*inputs).detach(), rtol=1e-5, atol=1e-5)
    assert result.graph.num_params <= graph.num_params
    again = manager.run(result.graph, PassContext(calibration=[inputs]))
    assert not again.modified and again.graph.module.code == result.graph.module.code
    assert unchanged(model, before)
