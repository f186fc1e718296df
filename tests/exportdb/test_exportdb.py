"""torch's ExportDB examples (control flow, pytrees, scalars, mutation) through capture, cleanup, backends.

Each case is captured once per module and compiled once per target (module-scoped caches).  Every
case captures exactly (keyword arguments through capture's example_kwargs, taken by position after the
others); the cleanup pipeline keeps it equal to eager; each
backend either matches eager (same output structure, shapes, dtypes; values within 1e-5) or refuses
with a one-line FxpressError.  Which cases a backend refuses is pinned in REFUSED, so a new refusal
(or a fixed one) shows up here.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._export.db.examples import all_examples
from torch.utils import _pytree as pytree

from fxpress import backends
from fxpress.errors import ArtifactError, CaptureError, FxpressError, LoweringError
from fxpress.ir import capture
from fxpress.ir.verify import verify
from fxpress.passes import PassManager

torch.set_num_threads(1)

EXAMPLES = dict(sorted(all_examples().items()))
WITH_KWARGS = [name for name, case in EXAMPLES.items() if case.example_kwargs]
CASES = list(EXAMPLES)
TARGETS = ["llvm", "onnx", "native"]
CLEANUP = "fold-constants,fuse-batchnorm,dce"
TOLERANCE = 1e-5
# (case, target) -> what the one-line refusal says: torch.map has no TVM or ONNX form.
REFUSED = {("dynamic_shape_map", "llvm"): "torch.map_impl", ("dynamic_shape_map", "onnx"): "torch.map_impl"}


def fresh_args(name: str) -> tuple:
    """The case's example arguments and then its keyword arguments' values (as the graph takes them), tensors
    copied (some cases write into their inputs)."""
    case = EXAMPLES[name]
    values = tuple(case.example_args) + tuple((case.example_kwargs or {}).values())
    return pytree.tree_map_only(torch.Tensor, torch.clone, values)


def eager(name: str):
    case = EXAMPLES[name]
    args = fresh_args(name)
    positional = len(case.example_args)
    with torch.no_grad():
        return case.model(*args[:positional], **dict(zip(case.example_kwargs or {}, args[positional:])))


def assert_same(got, expected) -> None:
    """Same pytree structure, Python numbers equal, tensors of equal shape and dtype within TOLERANCE."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(expected)
    assert got_spec == want_spec
    for value, want in zip(got_leaves, want_leaves):
        assert type(value) is type(want)
        if isinstance(want, torch.Tensor):
            assert (value.shape, value.dtype) == (want.shape, want.dtype)
            assert torch.allclose(value.double(), want.double(), atol=TOLERANCE, rtol=TOLERANCE, equal_nan=True)
        else:
            assert value == want


@pytest.fixture(scope="module")
def graphs():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                case = EXAMPLES[name]
                cache[name] = capture(case.model, pytree.tree_map_only(torch.Tensor, torch.clone, case.example_args),
                                      name=name, example_kwargs=case.example_kwargs or None)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def compiled(graphs):
    """compiled(name, target) -> CompiledModel or the FxpressError it was refused with; once per module."""
    cache: dict = {}

    def get(name: str, target: str):
        if (name, target) not in cache:
            try:
                cache[name, target] = backends.compile(graphs(name), target)
            except FxpressError as err:
                cache[name, target] = err
        return cache[name, target]

    return get


def test_the_corpus_is_all_there():
    assert len(CASES) >= 36 and WITH_KWARGS == ["fn_with_kwargs"]
    assert {"cond_closed_over_variable", "dynamic_shape_map", "list_unpack", "scalar_output"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_capture_matches_eager(graphs, name):
    graph = graphs(name)
    verify(graph)
    assert_same(graph(*fresh_args(name)), eager(name))


@pytest.mark.parametrize("name", WITH_KWARGS)
def test_keyword_arguments_left_out_are_named_in_one_line(name):
    with pytest.raises(CaptureError) as caught:
        capture(EXAMPLES[name].model, EXAMPLES[name].example_args, name=name)
    message = str(caught.value)
    assert "\n" not in message and "mykw0" in message and "example_kwargs=" in message


@pytest.mark.parametrize("name", CASES)
def test_cleanup_pipeline_keeps_eager(graphs, name):
    result = PassManager(CLEANUP).run(graphs(name))
    verify(result.graph)
    assert_same(result.graph(*fresh_args(name)), eager(name))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", CASES)
def test_backend_matches_eager_or_refuses_in_one_line(compiled, name, target):
    model = compiled(name, target)
    if (name, target) in REFUSED:
        assert isinstance(model, LoweringError), f"{name} on {target} compiled; update REFUSED"
        assert "\n" not in str(model) and REFUSED[name, target] in str(model)
        return
    assert not isinstance(model, FxpressError), f"{name} on {target} refused: {model}"
    assert_same(model(*fresh_args(name)), eager(name))


# -- structured inputs and outputs of compiled models -------------------------------------------
def test_list_input_dict_output_and_scalar_output_are_restored(compiled):
    assert isinstance(compiled("list_unpack", "llvm")(*fresh_args("list_unpack")), torch.Tensor)
    assert set(compiled("dictionary", "llvm")(*fresh_args("dictionary"))) == {"y"}
    assert compiled("scalar_output", "onnx")(*fresh_args("scalar_output")) == 3


def test_wrong_structure_and_changed_constant_are_clear_errors(compiled):
    model = compiled("list_unpack", "llvm")
    x, rest = fresh_args("list_unpack")[0][0], fresh_args("list_unpack")[0][1:]
    with pytest.raises(ArtifactError, match=r"expected 1 inputs \(\[tensor, tensor, tensor\],\), got 3"):
        model(x, *rest)
    with pytest.raises(ArtifactError, match=r"expected inputs \(\[tensor, tensor, tensor\],\), got "
                                            r"\(\(tensor, tensor, tensor\),\)"):
        model((x, *rest))
    setattr_model = compiled("tensor_setattr", "onnx")
    with pytest.raises(ArtifactError, match="input leaf 1 was fixed at 'attr'"):
        setattr_model(torch.randn(3, 2), "other")
    assert torch.equal(setattr_model(torch.ones(3, 2), "attr"), torch.full((3, 2), 5.0))


@pytest.mark.parametrize("target", TARGETS)
def test_compiled_model_leaves_its_inputs_alone(compiled, target):
    x = torch.randn(3, 2)
    before = x.clone()
    out = compiled("user_input_mutation", target)(x)
    assert torch.equal(x, before) and torch.allclose(out, (before * 2).cos())


@pytest.mark.parametrize("target", ["llvm", "onnx", "native"])
def test_structured_model_saves_and_loads(compiled, tmp_path, target):
    for name in ("list_unpack", "dictionary", "scalar_output", "cond_closed_over_variable"):
        model = compiled(name, target)
        loaded = backends.load(model.save(tmp_path / f"{name}-{target}"))
        assert_same(loaded(*fresh_args(name)), eager(name))


def test_cond_takes_either_branch_on_llvm(compiled):
    model = compiled("cond_closed_over_variable", "llvm")
    x = torch.randn(3, 2)
    assert torch.allclose(model(torch.tensor(True), x), x * 2)
    assert torch.allclose(model(torch.tensor(False), x), x - 2)
