"""Cleanup passes keep higher-order ops (torch.cond, map) and their subgraphs, and stay exact.

The branch and body subgraphs are submodules that only a get_attr node reads; dce and fold-constants
delete attributes nothing reads, and used to delete these ("Node referenced nonexistent target
true_graph_0").
"""
from __future__ import annotations

import torch
from functorch.experimental.control_flow import map as torch_map
from torch import nn

import fxpress
from fxpress.ir.verify import verify
from fxpress.passes import PassContext, PassManager
from fxpress.passes.cleanup.dce import DeadCodeElimination
from fxpress.passes.cleanup.fold_constants import FoldConstants

torch.set_num_threads(1)

CTX = PassContext()


class CondWithDeadCode(nn.Module):
    """A torch.cond over a closed-over input, a folding candidate (scale * 2) and an unused buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([1.5, -0.5]))
        self.register_buffer("unused", torch.ones(3))

    def forward(self, pred, x):
        scale = self.scale * 2

        def true_fn(val):
            return x * scale + val

        def false_fn(val):
            return x - val

        dead = x.exp()  # noqa: F841 - dead code for dce
        return torch.cond(pred, true_fn, false_fn, [x + 1])


class NestedCond(nn.Module):
    def forward(self, pred, x):
        def inner_true(y):
            return y.sin()

        def inner_false(y):
            return y.cos()

        def outer_true(y):
            return torch.cond(y.sum() > 0, inner_true, inner_false, [y])

        def outer_false(y):
            return y * 3

        return torch.cond(pred, outer_true, outer_false, [x])


class MapBody(nn.Module):
    def forward(self, xs, y):
        return torch_map(lambda x, y: x * y + 1, xs, y)


def _inputs(pred: bool) -> tuple:
    return torch.tensor(pred), torch.randn(3, 2, generator=torch.Generator().manual_seed(0))


def _subgraphs(graph) -> list[str]:
    return sorted(str(n.target) for n in graph.fx.nodes
                  if n.op == "get_attr" and isinstance(graph.attribute(str(n.target)), torch.nn.Module))


def test_dce_keeps_cond_branches_and_drops_the_rest():
    model = CondWithDeadCode()
    graph = fxpress.capture(model, _inputs(True))
    assert _subgraphs(graph) == ["false_graph_0", "true_graph_0"]
    result = DeadCodeElimination()(graph, CTX)
    assert result.modified and result.stats["removed_attributes"] == 1
    assert _subgraphs(result.graph) == ["false_graph_0", "true_graph_0"]
    assert not any(n.op == "call_function" and "exp" in str(n.target) for n in result.graph.fx.nodes)
    verify(result.graph)
    for pred in (True, False):
        assert torch.equal(result.graph(*_inputs(pred)), model(*_inputs(pred)))


def test_fold_constants_folds_around_a_cond_and_keeps_it():
    model = CondWithDeadCode()
    graph = fxpress.capture(model, _inputs(True))
    result = FoldConstants()(graph, CTX)
    assert result.modified and result.stats["folded_nodes"] == 1
    assert _subgraphs(result.graph) == ["false_graph_0", "true_graph_0"]
    verify(result.graph)
    for pred in (True, False):
        assert torch.equal(result.graph(*_inputs(pred)), model(*_inputs(pred)))


def test_cleanup_pipeline_keeps_nested_cond_subgraphs():
    model = NestedCond()
    graph = fxpress.capture(model, _inputs(True))
    result = PassManager("fold-constants,fuse-batchnorm,dce").run(graph)
    nested = result.graph.attribute("true_graph_0")
    assert any(n.op == "get_attr" for n in nested.graph.nodes)  # the inner cond's branches
    verify(result.graph)
    for pred in (True, False):
        assert torch.equal(result.graph(*_inputs(pred)), model(*_inputs(pred)))


def test_cleanup_pipeline_keeps_map_body():
    model = MapBody()
    xs, y = torch.randn(4, 2), torch.randn(2)
    graph = fxpress.capture(model, (xs, y))
    result = PassManager("fold-constants,fuse-batchnorm,dce").run(graph)
    assert _subgraphs(result.graph) == ["body_graph_0"]
    assert torch.equal(result.graph(xs, y), model(xs, y))


def test_subgraph_modules_count_as_used():
    graph = fxpress.capture(NestedCond(), _inputs(True)).copy()
    assert graph.used_submodules() == {"true_graph_0", "false_graph_0"}
    assert graph.remove_unused_attributes() == []
    assert {name for name, _ in graph.module.named_modules()} >= {
        "true_graph_0", "false_graph_0", "true_graph_0.true_graph_0", "true_graph_0.false_graph_0"}


class DoubleThrice(nn.Module):
    def forward(self, i, x):
        from torch._higher_order_ops.while_loop import while_loop

        return while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, x * 2), (i, x))


def test_cleanup_pipeline_keeps_while_loop_subgraphs():
    args = (torch.tensor(0), torch.randn(3))
    graph = fxpress.capture(DoubleThrice(), args)
    result = PassManager("fold-constants,fuse-batchnorm,dce").run(graph)
    assert _subgraphs(result.graph) == _subgraphs(graph) and len(_subgraphs(graph)) == 2
    verify(result.graph)
    count, doubled = result.graph(*args)
    assert int(count) == 3 and torch.equal(doubled, args[1] * 8)
