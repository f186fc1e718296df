"""sparse-kernels: linear -> sparse_linear where the weight is sparse enough; numerics, bytes, artifacts."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import OptionError
from fxpress.ops.sparse import SPARSE_LINEAR
from fxpress.passes import NumericCheck, PassContext, PassManager, VerifyAfterPass, parse_pipeline
from fxpress.passes.sparsity import sparse_kernels  # noqa: F401  (registers the pass)
from fxpress.passes.sparsity.sparse_kernels import table_speedup

torch.set_num_threads(1)


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64), torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def block_prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the `sparsity` fraction of 4x1 blocks with the smallest L1 norm."""
    blocks = weight.abs().view(weight.shape[0] // 4, 4, weight.shape[1]).sum(1)
    cut = blocks.flatten().kthvalue(int(sparsity * blocks.numel())).values
    return weight * (blocks > cut).repeat_interleave(4, 0)


def mlp_graph(block_sparsity: float | None = 0.9, unstructured: float | None = None):
    torch.manual_seed(0)
    model = Mlp().eval()
    with torch.no_grad():
        for layer in (model.fc1, model.fc2):
            if block_sparsity is not None:
                layer.weight.copy_(block_prune(layer.weight, block_sparsity))
            if unstructured is not None:
                layer.weight.mul_(torch.rand_like(layer.weight) >= unstructured)
    return model, fxpress.capture(model, (torch.randn(2, 9, 64),))


def checked(pipeline: str) -> PassManager:
    return PassManager(pipeline, [VerifyAfterPass(), NumericCheck()])


def test_block_sparse_layers_become_sparse_linear():
    model, graph = mlp_graph(0.9)
    graph.masks["fc1.weight"] = model.fc1.weight.ne(0)
    result = checked("sparse-kernels").run(graph, PassContext())
    stats = result.reports[0].stats
    layers = {layer["layer"]: layer for layer in stats["layers"]}
    assert layers["fc1"]["form"] == layers["fc2"]["form"] == "block" and layers["fc1"]["chosen"]
    assert not layers["head"]["chosen"] and "min_speedup" in layers["head"]["reason"]  # dense head
    new = result.graph
    sparse = [node for node in new.fx.nodes if node.target == SPARSE_LINEAR]
    assert [new.info(node).module_path for node in sparse] == ["fc1", "fc2"]
    assert "fc1.weight" not in new.masks and not hasattr(new.module.fc1, "weight")
    assert stats["bytes_after"] < 0.3 * stats["bytes_before"]
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-5)
    again = checked("sparse-kernels").run(new, PassContext())
    assert not again.modified and again.reports[0].stats["reason"]


def test_dense_weights_are_refused_with_a_reason():
    _, graph = mlp_graph(None)
    result = PassManager("sparse-kernels").run(graph, PassContext())
    assert not result.modified
    stats = result.reports[0].stats
    assert stats["replaced"] == 0 and "predicted" in stats["reason"]
    assert all(not layer["chosen"] for layer in stats["layers"])


def test_unstructured_sparsity_picks_csr_and_forced_forms():
    model, graph = mlp_graph(None, unstructured=0.95)
    result = checked("sparse-kernels").run(graph, PassContext())
    assert {layer["form"] for layer in result.reports[0].stats["layers"] if layer["chosen"]} == {"csr"}
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(result.graph(x), model(x), rtol=1e-4, atol=1e-5)
    forced = checked("sparse-kernels{form=block,min_speedup=0.1}").run(graph, PassContext())
    assert {layer["form"] for layer in forced.reports[0].stats["layers"]} == {"block"}
    torch.testing.assert_close(forced.graph(x), model(x), rtol=1e-4, atol=1e-5)


def test_timed_measure_decides_by_the_measured_speedup():
    model, graph = mlp_graph(0.95)
    layers = PassManager("sparse-kernels{measure=time}").run(graph, PassContext()).reports[0].stats["layers"]
    assert all(layer["chosen"] == (layer["speedup"] >= 1.0) for layer in layers)  # tiny layers: call overhead
    result = checked("sparse-kernels{measure=time,min_speedup=0.001}").run(graph, PassContext())
    assert all(layer["chosen"] for layer in result.reports[0].stats["layers"])
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(result.graph(x), model(x), rtol=1e-4, atol=1e-5)


def test_options_and_table():
    assert str(parse_pipeline("sparse-kernels{form=csr,min_speedup=1.5,measure=time}")[0]) == \
        "sparse-kernels{form=csr,min_speedup=1.5,measure=time}"
    with pytest.raises(OptionError):
        parse_pipeline("sparse-kernels{min_speedup=0}")
    assert table_speedup("block", 0.9) > table_speedup("block", 0.5) > 1.0 > table_speedup("csr", 0.5)
    assert table_speedup("block", 0.99) == table_speedup("block", 0.98)


@pytest.mark.parametrize("target", ["native", "llvm"])
def test_compiled_artifact_round_trip(target, tmp_path):
    model, graph = mlp_graph(0.9)
    dense_bytes = graph.param_bytes
    new = PassManager("sparse-kernels").run(graph, PassContext()).graph
    compiled = fxpress.compile(new, target)
    x = graph.example_inputs[0]
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    folder = compiled.save(tmp_path / "sparse")
    loaded = fxpress.load(folder)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    if target == "native":
        stored = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
        assert stored < 0.5 * dense_bytes
