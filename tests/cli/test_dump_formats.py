"""Graph exports from the command line: `fxpress dump --format onnx,pt2,model-explorer` writes files that
onnx.checker, onnxruntime, torch.export.load and Model Explorer take; `fxpress run --dump-changed-only`
dumps only the passes that changed the graph; `--dump-tvm-ir` writes TVM's Relax and TIR as text; a bad
format or option is one line on stderr and exit status 2."""
from __future__ import annotations

import json
import logging
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fxpress
from fxpress.cli import main
from fxpress.errors import FxpressError
from fxpress.ir.printer import write_dump
from fxpress.passes import DumpToDir
from fxpress.zoo.specs import resolve_model

ALL_FORMATS = "txt, dot, json, svg, png, model-explorer, onnx, pt2"


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """`fxpress dump vit-mnist --format onnx,pt2,model-explorer`, and the graph it captured."""
    out = tmp_path_factory.mktemp("dump")
    assert main(["--threads", "1", "dump", "vit-mnist", "--format", "onnx,pt2,model-explorer",
                 "--out", str(out)]) == 0
    model = resolve_model("vit-mnist")
    graph = fxpress.capture(model.module, model.example_inputs, dynamic=model.dynamic_dims, name=model.name)
    return out, graph


def test_dump_writes_the_three_files(dumped):
    out, _ = dumped
    assert sorted(p.name for p in out.iterdir()) == [
        "vit-mnist.model-explorer.json", "vit-mnist.onnx", "vit-mnist.pt2"]


def test_onnx_file_checks_and_runs_like_the_graph(dumped):
    out, graph = dumped
    path = out / "vit-mnist.onnx"
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert model.graph.initializer, "the weights are inside the file"
    assert model.graph.name == "vit-mnist"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image,) = graph.example_inputs
    (result,) = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    with torch.no_grad():
        expected = graph(image)
    np.testing.assert_allclose(result, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_pt2_file_loads_and_gives_the_graphs_outputs(dumped):
    out, graph = dumped
    program = torch.export.load(out / "vit-mnist.pt2")
    with torch.no_grad():
        (result,) = program.module()(*graph.example_inputs)
        assert torch.equal(result, graph(*graph.example_inputs))


def test_model_explorer_file_holds_every_node(dumped):
    out, graph = dumped
    data = json.loads((out / "vit-mnist.model-explorer.json").read_text())
    assert data["label"] == "vit-mnist (fxpress)"
    (graph_json,) = data["graphs"]
    assert [node["id"] for node in graph_json["nodes"]] == [node.name for node in graph.fx.nodes]


def test_dump_changed_only_skips_passes_that_change_nothing(tmp_path, caplog):
    """fold-constants and dce change nothing on vit-mnist: their numbers (001, 002) stay unused.  The merged
    graph holds fxpress::merge_tokens, which ONNX has no form of: a warning, not a failed run."""
    with caplog.at_level(logging.WARNING, logger="fxpress.passes.infra.instruments"):
        assert main(["--threads", "1", "run", "vit-mnist", "--pipeline", "fold-constants,dce,merge-tokens{r=4}",
                     "--calibration", "1", "--dump-dir", str(tmp_path), "--dump-changed-only",
                     "--dump-format", "txt,onnx"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_capture.onnx", "000_capture.txt", "003_merge-tokens.txt"]
    assert "fxpress.merge_tokens" in (tmp_path / "003_merge-tokens.txt").read_text()
    assert "could not dump 003_merge-tokens as onnx" in caplog.text and "no ONNX form" in caplog.text


def test_dump_tvm_ir_writes_relax_and_tir_text(tmp_path):
    factory = tmp_path / "small.py"
    factory.write_text(textwrap.dedent("""
        import torch

        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
            return model, (torch.randn(2, 8),)
    """))
    folder = tmp_path / "tvm-ir"
    assert main(["--threads", "1", "run", f"{factory}:make", "--pipeline", "dce", "--calibration", "0",
                 "--target", "llvm", "--dump-tvm-ir", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["00_lowered.relax.py", "01_fused.tir.py",
                                                        "02_scheduled.tir.py"]
    relax_text = (folder / "00_lowered.relax.py").read_text()
    assert "@I.ir_module" in relax_text and "@R.function" in relax_text and "R.matmul" in relax_text
    fused, scheduled = (folder / "01_fused.tir.py").read_text(), (folder / "02_scheduled.tir.py").read_text()
    assert "@T.prim_func" in fused and "@T.prim_func" in scheduled
    assert "T.parallel" not in fused and "T.parallel" in scheduled  # the schedules ran in between


@pytest.mark.parametrize("args, fragments", [
    (["dump", "vit-mnist", "--format", "onnx,pdf", "--out", "{tmp}"], ["unknown dump format 'pdf'", ALL_FORMATS]),
    (["run", "vit-mnist", "--pipeline", "dce", "--dump-dir", "{tmp}", "--dump-format", "txt,svgz"],
     ["unknown dump format 'svgz'", ALL_FORMATS]),
    (["run", "vit-mnist", "--pipeline", "dce", "--dump-tvm-ir", "{tmp}"], ["--dump-tvm-ir", "--target llvm"]),
    (["run", "vit-mnist", "--pipeline", "dce", "--dump-changed-only"], ["--dump-dir DIR"]),
])
def test_bad_dump_options_are_one_line_with_exit_status_2(tmp_path, capsys, args, fragments):
    assert main(["--threads", "1", *[arg.format(tmp=tmp_path) for arg in args]]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not any(tmp_path.iterdir()), "nothing is written before the options are checked"


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x).relu()


def test_write_dump_takes_writers_for_more_formats(tmp_path):
    graph = fxpress.capture(Tiny(), (torch.randn(2, 4),))

    def names(graph, folder, stem):
        path = folder / f"{stem}.names"
        path.write_text(",".join(node.name for node in graph.fx.nodes))
        return path

    paths = write_dump(graph, tmp_path, "x", ("txt", "names"), writers={"names": names})
    assert [p.name for p in paths] == ["x.txt", "x.names"]
    assert (tmp_path / "x.names").read_text().startswith("fc_weight,")
    with pytest.raises(FxpressError, match="unknown dump format 'onnx'; use any of txt, dot, json, svg, png, names"):
        write_dump(graph, tmp_path, "x", ("onnx",), writers={"names": names})
    with pytest.raises(FxpressError, match="unknown dump format 'pdf'"):
        DumpToDir(tmp_path, formats=("txt", "pdf"))


def test_dump_to_dir_changed_only_keeps_the_numbers_of_passes_that_ran(tmp_path):
    """dce finds nothing dead in Tiny (modified=False): only the capture is dumped, and the number 001 is
    used by no file."""
    from fxpress.export.graph_files import GRAPH_FILE_WRITERS
    from fxpress.passes import PassManager

    graph = fxpress.capture(Tiny(), (torch.randn(2, 4),))
    dump = DumpToDir(tmp_path, formats=("txt", "model-explorer"), writers=GRAPH_FILE_WRITERS, changed_only=True)
    result = PassManager("dce", [dump]).run(graph)
    assert not result.reports[0].modified
    assert [p.name for p in dump.written] == ["000_capture.txt", "000_capture.model-explorer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in dump.written)
    assert dump.failed == []
