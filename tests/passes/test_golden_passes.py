"""Golden IR text before and after each built-in pass, on small models.

Each case captures a small model, runs one pass through the PassManager
(verify after the pass), and compares the printed IR before and after with
`tests/passes/golden/<case>.before.txt` and `<case>.after.txt`, so

    diff -u tests/passes/golden/merge-tokens.before.txt tests/passes/golden/merge-tokens.after.txt

shows what the pass does.  Regenerate after an intended change with

    FXPRESS_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/passes/test_golden_passes.py

and read the diff before committing it.  Every node a pass leaves must say
where it came from (`fxpress.ir.builder.origin`), and the text must not
depend on the process (hash seed, ids): a second process prints the same bytes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from model_factories import ConstantSubgraph, ConvBnRelu, randomize_batchnorm
from torch import nn

import fxpress
import golden
from fxpress.ir.builder import origin
from fxpress.ir.graph import Graph
from fxpress.ir.printer import format_graph
from fxpress.ir.verify import verify
from fxpress.passes import PassContext, PassManager, VerifyAfterPass
from fxpress.zoo import ViTConfig, VisionTransformer

torch.set_num_threads(1)
GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[2]


# -- small models -----------------------------------------------------------------------------
class DeadBranch(nn.Module):
    """A linear whose result nobody reads (dead code with its own parameters)."""

    def __init__(self):
        super().__init__()
        self.fc, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        _ = self.unused(x) * 2
        return torch.relu(y)


class FloatNet(nn.Module):
    """Float conv and linear layers: binarize turns the middle two into binary ops."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 6, 3, padding=1)
        self.mid = nn.Linear(6 * 5 * 5, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x)) - 0.1)
        return self.head(self.mid(x.flatten(1)))


class TokenCoder(nn.Module):
    """`encoder` outputs a (batch, tokens, dim) sequence; the decoder adds a per-token embedding."""

    def __init__(self, tokens: int = 6):
        super().__init__()
        self.encoder = nn.Linear(5, 8)
        self.token_pos = nn.Parameter(torch.randn(1, tokens, 8))
        self.decoder = nn.Linear(8, 3)

    def forward(self, x):
        return self.decoder(self.encoder(x) + self.token_pos).mean(1)


def tiny_vit() -> nn.Module:
    config = ViTConfig(image_size=8, patch_size=4, dim=8, depth=3, heads=2, mlp_ratio=2, num_classes=3)
    return VisionTransformer(config)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "dead-branch": (DeadBranch, (2, 4)),
    "constant-subgraph": (ConstantSubgraph, (2, 8)),
    "conv-bn-relu": (lambda: randomize_batchnorm(ConvBnRelu()), (1, 3, 4, 4)),
    "vit": (tiny_vit, (2, 1, 8, 8)),
    "float-net": (FloatNet, (2, 1, 5, 5)),
    "token-coder": (TokenCoder, (2, 6, 5)),
}


def capture_model(name: str) -> Graph:
    """Capture model `name` with seeded weights and inputs (same graph in every process)."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    return fxpress.capture(model, (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),))


@dataclass(frozen=True)
class Case:
    """Golden `<name>.before.txt` is the IR after `setup` (on `model`), `<name>.after.txt` after `pipeline`."""

    name: str
    model: str
    pipeline: str
    setup: str = ""  # passes run first, whose output is the "before" graph


CASES = [
    Case("dce", "dead-branch", "dce"),
    Case("fold-constants", "constant-subgraph", "fold-constants"),
    Case("fuse-batchnorm", "conv-bn-relu", "fuse-batchnorm"),
    Case("merge-tokens", "vit", "merge-tokens{r=2}"),
    Case("remove-layers", "vit", "remove-layers{count=1,metric=last}"),
    Case("share-weights", "vit", "share-weights"),
    Case("binarize", "float-net", "binarize"),
    Case("xnor-mst", "float-net", "xnor-mst", setup="binarize"),
    Case("tail-drop", "token-coder", "tail-drop{keep=2}"),
    Case("prune-width", "vit", "prune-width{heads=1,mlp=16,importance=magnitude}"),
    Case("sparse-kernels", "vit", "sparse-kernels{form=block}",
         setup="prune-obs{sparsity=0.75,block=4x1,score=magnitude}"),
]


def run_case(case: Case) -> tuple[Graph, Graph]:
    """(graph before the pass, graph after it), both through the manager with verification."""
    graph = capture_model(case.model)
    if case.setup:
        graph = PassManager(case.setup, [VerifyAfterPass()]).run(graph, PassContext()).graph
    result = PassManager(case.pipeline, [VerifyAfterPass()]).run(graph, PassContext())
    assert result.modified, f"{case.pipeline} did nothing on {case.model}: {result.reports[-1].stats}"
    return graph, result.graph


def case_texts(case: Case) -> tuple[str, str]:
    before, after = run_case(case)
    return format_graph(before), format_graph(after)


# -- golden text ------------------------------------------------------------------------------
def check_golden(name: str, text: str) -> None:
    """Compare `text` with the golden file `name` beside this test (tests/golden.py)."""
    golden.check_golden(GOLDEN, name, text)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pass_golden_text(case):
    before, after = run_case(case)
    check_golden(f"{case.name}.before.txt", format_graph(before))
    check_golden(f"{case.name}.after.txt", format_graph(after))
    verify(after)
    missing = [n.format_node() for n in after.fx.nodes if n.op == "call_function" and origin(n) is None]
    assert not missing, f"{case.pipeline} left nodes without provenance: {missing}"
    assert format_graph(before) != format_graph(after)


def test_inserted_nodes_name_the_pass_that_made_them():
    """Nodes a pass creates carry its name; nodes it keeps still say `capture`."""
    for case in (c for c in CASES if c.name in ("merge-tokens", "binarize", "tail-drop")):
        before, after = run_case(case)
        makers = {origin(n)["pass"] for n in after.fx.nodes if n.op == "call_function"}
        assert makers >= {"capture", case.name}, (case.name, makers)
        assert {origin(n)["pass"] for n in before.fx.nodes if n.op == "call_function"} == {"capture"}


def test_golden_text_is_the_same_in_another_process():
    """Another interpreter with another hash seed prints every case's IR as the golden files hold it."""
    script = ("import sys, json, torch; import test_golden_passes as t; "
              "sys.stdout.write(json.dumps({c.name: t.case_texts(c) for c in t.CASES}))")
    env = dict(os.environ, PYTHONHASHSEED="4321",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), str(Path(__file__).parent)]))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, (before, after) in json.loads(done.stdout).items():
        check_golden(f"{name}.before.txt", before)
        check_golden(f"{name}.after.txt", after)
