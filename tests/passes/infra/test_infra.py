"""The pass infrastructure: registry, pipelines, manager contract, instruments, errors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
import torch
from torch import nn

import fxpress
from fxpress.ir.builder import Builder
from fxpress.errors import CalibrationError, NumericError, PassError, PipelineError, VerificationError
from fxpress.passes import (DumpToDir, NumericCheck, Pass, PassContext, PassManager, PassResult,
                            VerifyAfterPass, format_pipeline, parse_pipeline, register_pass)
from fxpress.passes.infra.registry import _REGISTRY

torch.set_num_threads(1)


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.fixture
def graph():
    return fxpress.capture(TwoBlocks().eval(), (torch.randn(3, 8),))


@dataclass(frozen=True)
class _Options(Pass):
    """x -> x (test pass with options)."""

    name: ClassVar[str] = "test-options"
    ratio: float = 0.25
    count: int | None = None
    metric: Literal["angular", "cosine"] = "angular"
    protect: bool = True
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise self.bad_option(f"ratio must be in [0, 1), got {self.ratio}")

    def __call__(self, graph, ctx):
        return PassResult(graph, modified=False, stats={"reason": "a test pass that never rewrites"})


@dataclass(frozen=True)
class _Scale(Pass):
    """x -> 2 * output (a lossy test pass that rewrites the graph)."""

    name: ClassVar[str] = "test-scale"
    preserves_semantics: ClassVar[bool] = True  # lies, so NumericCheck must catch it

    def __call__(self, graph, ctx):
        new = graph.copy()
        out = next(n for n in new.fx.nodes if n.op == "output")
        (value,) = out.args[0]
        doubled = Builder(new, self.name).call_before(out, torch.ops.aten.mul.Tensor, value, 2.0, like=value)
        out.args = ((doubled,),)
        return PassResult(new.recompile(), modified=True)


@dataclass(frozen=True)
class _Mutator(Pass):
    """x -> x, but edits its input in place (forbidden)."""

    name: ClassVar[str] = "test-mutator"

    def __call__(self, graph, ctx):
        graph.fx.eliminate_dead_code()
        graph.module.recompile()
        return PassResult(graph, modified=True)


@dataclass(frozen=True)
class _Crash(Pass):
    """x -> crash."""

    name: ClassVar[str] = "test-crash"

    def __call__(self, graph, ctx):
        raise RuntimeError("boom")


for _cls in (_Options, _Scale, _Mutator, _Crash):
    register_pass(_cls)


def test_pipeline_round_trip():
    text = "test-options{ratio=0.5,count=3,metric=cosine,protect=false,layers=1;2},dce"
    passes = parse_pipeline(text)
    assert passes[0] == _Options(ratio=0.5, count=3, metric="cosine", protect=False, layers=(1, 2))
    assert format_pipeline(passes) == text
    assert parse_pipeline(format_pipeline(passes)) == passes
    assert str(parse_pipeline("dce")[0]) == "dce"
    assert str(_Options()) == "test-options{ratio=0.25,count=None,metric=angular,protect=true,layers=}"
    assert parse_pipeline("test-options{count=none}")[0].count is None


@pytest.mark.parametrize("text, message", [
    ("no-such-pass", "unknown pass 'no-such-pass'"),
    ("dec", "did you mean 'dce'"),
    ("test-options{size=1}", "pass 'test-options' has no option 'size'"),
    ("test-options{ratio=abc}", "bad value 'abc' for option 'ratio'"),
    ("test-options{ratio=1.5}", "ratio must be in [0, 1)"),
    ("test-options{metric=l2}", "choose one of angular, cosine"),
    ("test-options{protect=maybe}", "expected true or false"),
    ("test-options{ratio}", "must be written key=value"),
    ("dce,,dce", "empty pass"),
    ("test-options{ratio=0.1", "unbalanced"),
])
def test_bad_pipelines(text, message):
    with pytest.raises(PipelineError) as err:
        parse_pipeline(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_register_rejects_bad_classes():
    with pytest.raises(PipelineError, match="kebab-case"):
        register_pass(type("Bad", (Pass,), {"name": "Bad_Name"}))
    with pytest.raises(PipelineError, match="dataclass"):
        register_pass(type("NotDataclass", (Pass,), {"name": "not-dataclass"}))
    with pytest.raises(PipelineError, match="taken"):
        register_pass(dataclass(type("Twin", (Pass,), {"__annotations__": {}, "name": "dce"})))
    assert "not-dataclass" not in _REGISTRY


def test_manager_reports_and_idempotence(graph):
    pm = PassManager("dce", [VerifyAfterPass(), NumericCheck()])
    first = pm.run(graph)
    (report,) = first.reports
    assert report.modified and report.stats["removed_attributes"] == 2
    assert report.after["params"] == report.before["params"] - 72
    assert report.error["max_abs"] == 0.0
    second = pm.run(first.graph)
    assert not second.modified and second.graph is first.graph
    assert second.reports[0].error is None
    assert graph.num_params == sum(p.numel() for p in TwoBlocks().parameters())  # input untouched


def test_numeric_check_catches_a_lying_pass(graph):
    with pytest.raises(NumericError, match="pass 'test-scale' failed.*passes run before it: dce"):
        PassManager("dce,test-scale", [NumericCheck()]).run(graph)


def test_mutating_pass_is_rejected(graph):
    with pytest.raises(PassError, match="changed the graph it was given"):
        PassManager("test-mutator").run(graph)


def test_crash_names_pass_and_history(graph):
    with pytest.raises(PassError) as err:
        PassManager("dce,test-crash").run(graph)
    assert str(err.value) == "pass 'test-crash' failed: RuntimeError: boom (passes run before it: dce)"
    assert isinstance(err.value.__cause__, RuntimeError)


def test_verify_catches_stale_metadata(graph):
    bad = graph.copy()
    node = next(n for n in bad.fx.nodes if n.op == "call_function")
    node.meta["fxpress"] = node.meta["fxpress"].__class__(**{**vars(node.meta["fxpress"]), "shape": (9, 9)})
    with pytest.raises(VerificationError, match="stale metadata"):
        fxpress.verify(bad)
    fxpress.verify(graph)


@pytest.mark.parametrize("batch, message", [
    ((torch.randn(3, 9),), r"calibration input 0 is torch.float32\[3, 9\]"),
    ((torch.randn(3, 8), torch.randn(3, 8)), "has 2 inputs, the model takes 1"),
    ((torch.randint(0, 3, (3, 8)),), "torch.int64"),
    (torch.randn(3, 8), "must be a tuple"),
])
def test_bad_calibration(graph, batch, message):
    with pytest.raises(CalibrationError, match=message):
        PassManager("dce").run(graph, PassContext(calibration=[batch]))


def test_dynamic_batch_accepts_other_sizes():
    model = TwoBlocks().eval()
    graph = fxpress.capture(model, (torch.randn(3, 8),), dynamic=True)
    batch = (torch.randn(5, 8),)
    result = PassManager("dce", [NumericCheck()]).run(graph, PassContext(calibration=[batch]))
    assert torch.equal(result.graph(*batch), model(*batch))


def test_dump_to_dir_names_files(graph, tmp_path):
    dump = DumpToDir(tmp_path, formats=("txt", "json"))
    PassManager("dce,test-options", [dump]).run(graph)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_capture.json", "000_capture.txt", "001_dce.json", "001_dce.txt",
        "002_test-options.json", "002_test-options.txt"]
    assert "blocks.0.0" in (tmp_path / "001_dce.txt").read_text()


def test_context_requirements():
    ctx = PassContext()
    with pytest.raises(PassError, match="pass 'x' failed: needs calibration data"):
        ctx.require_calibration("x")
    with pytest.raises(PassError, match="needs a teacher"):
        ctx.require_teacher("x")
    assert torch.equal(torch.rand(3, generator=ctx.generator()), torch.rand(3, generator=ctx.generator()))


@dataclass(frozen=True)
class _Anonymous(Pass):
    """x -> 3 * output, built without the Builder (forbidden: the node has no provenance)."""

    name: ClassVar[str] = "test-anonymous"

    def __call__(self, graph, ctx):
        new = graph.copy()
        out = next(n for n in new.fx.nodes if n.op == "output")
        (value,) = out.args[0]
        with new.fx.inserting_before(out):
            tripled = new.fx.call_function(torch.ops.aten.mul.Tensor, (value, 3.0))
        out.args = ((tripled,),)
        return PassResult(new.recompile(), modified=True)


register_pass(_Anonymous)


def test_the_manager_rejects_nodes_without_provenance(graph):
    with pytest.raises(PassError, match="without provenance.*passes run before it: dce"):
        PassManager("dce,test-anonymous").run(graph, PassContext())
