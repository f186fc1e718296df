"""Graph files that other tools open, and the dump formats they add to `write_dump`.

    model-explorer  <stem>.model-explorer.json   Google Model Explorer (nested layers per module)
    onnx            <stem>.onnx                  Netron, onnxruntime (weights inside the file)
    pt2             <stem>.pt2                   torch.export.load (an ExportedProgram over flat tensors)

The ONNX and .pt2 files come from the backends' own re-export of the graph
(:func:`fxpress.backends.structure.export_flat`), at the shapes of the
graph's example inputs, taking its tensor inputs flat and returning its
output leaves.  :func:`write_graph_files` is `write_dump` with these
formats added; `fxpress dump` and `fxpress run --dump-dir` go through it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from fxpress.backends.onnx import export_onnx
from fxpress.backends.structure import export_flat
from fxpress.errors import LoweringError
from fxpress.export.model_explorer import SUFFIX as MODEL_EXPLORER_SUFFIX
from fxpress.export.model_explorer import write_model_explorer
from fxpress.ir import Graph
from fxpress.ir.printer import GraphFileWriter, check_dump_formats, dump_formats, write_dump

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1  # bytes; a larger ONNX model keeps its weights in a .data file beside it


def write_onnx(graph: Graph, path: str | Path) -> Path:
    """Export `graph` to ONNX with its weights at `path`; checked with onnx.checker.  LoweringError for an
    op that ONNX has no form of (the ops passes insert)."""
    import onnx

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    model, _ = export_onnx(graph, dynamic=False)
    model.graph.name = graph.name
    external = model.ByteSize() > PROTOBUF_LIMIT
    if external:
        log.warning("%s is over 2 GB: its weights go to %s.data beside it", target.name, target.name)
    onnx.save_model(model, str(target), save_as_external_data=external, location=f"{target.name}.data")
    try:
        onnx.checker.check_model(str(target))
    except onnx.checker.ValidationError as err:
        raise LoweringError(f"the ONNX export of graph {graph.name} fails onnx.checker: {err}") from err
    return target


def write_pt2(graph: Graph, path: str | Path) -> Path:
    """Save `graph` re-exported over its flat tensor inputs with `torch.export.save`; returns the path.

    Load it with `torch.export.load(path).module()`; a graph holding ops that passes insert needs
    `import fxpress` first, which registers them.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    flat = export_flat(graph, False, "pt2")
    torch.export.save(flat.program, target)
    return target


def _in_folder(suffix: str, write: Callable[[Graph, Path], Path]) -> GraphFileWriter:
    """A `write_dump` writer that writes `folder/<stem><suffix>` with `write(graph, path)`."""
    return lambda graph, folder, stem: write(graph, folder / f"{stem}{suffix}")


GRAPH_FILE_WRITERS: dict[str, GraphFileWriter] = {
    "model-explorer": _in_folder(MODEL_EXPLORER_SUFFIX, write_model_explorer),
    "onnx": _in_folder(".onnx", write_onnx),
    "pt2": _in_folder(".pt2", write_pt2),
}


def graph_file_formats() -> tuple[str, ...]:
    """Every dump format: txt, dot, json, svg, png, model-explorer, onnx, pt2."""
    return dump_formats(GRAPH_FILE_WRITERS)


def parse_formats(text: str) -> tuple[str, ...]:
    """`"txt,onnx"` -> ("txt", "onnx"); FxpressError naming every allowed format for an unknown one."""
    return check_dump_formats([part.strip() for part in text.split(",") if part.strip()], GRAPH_FILE_WRITERS)


def write_graph_files(graph: Graph, directory: str | Path, stem: str, formats: tuple[str, ...] = ("txt",),
                      *, collapse: int | None = None) -> list[Path]:
    """`write_dump` with the formats of this module too; returns the paths written."""
    return write_dump(graph, directory, stem, formats, collapse=collapse, writers=GRAPH_FILE_WRITERS)
