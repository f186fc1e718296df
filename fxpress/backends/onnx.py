"""ONNX backend: export with ``torch.onnx.export(dynamo=True)``, run with onnxruntime.

The saved artifact keeps the ONNX graph (``model.onnx``) without its
weights; the initializers go to ``params.safetensors`` like every other
backend's parameters and are put back into the graph at load time.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from fxpress.backends.onnx_fixes import fix_for_onnx
from fxpress.backends.signature import TensorSpec
from fxpress.backends.structure import FlatExport, IOStructure, export_flat
from fxpress.errors import ArtifactError, LoweringError
from fxpress.ir import Graph

log = logging.getLogger(__name__)


def _split_initializers(model) -> dict[str, np.ndarray]:
    """Move every initializer out of `model` (in place) into a name -> array dict."""
    from onnx import numpy_helper

    params = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    del model.graph.initializer[:]
    return params


def _join_initializers(model, params: dict[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    for name, value in params.items():
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name=name))


class OnnxExecutable:
    """An ONNX graph and its initializers, run by an onnxruntime session on the CPU."""

    backend = "onnx"

    def __init__(self, model, params: dict[str, np.ndarray], threads: int | None = None):
        self.graph_bytes = model.SerializeToString()  # without initializers
        self.params = params
        self.param_names = list(params)
        _join_initializers(model, params)
        self._model_bytes = model.SerializeToString()
        self.set_threads(threads or torch.get_num_threads())

    def set_threads(self, threads: int) -> None:
        """onnxruntime fixes a session's threads at creation: make a new session."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # failures come back as exceptions (then LoweringError), not logs
        try:
            self.session = ort.InferenceSession(self._model_bytes, options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own kinds
            raise LoweringError(f"onnxruntime cannot load the exported model: {err}") from err
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        feed = {name: x.detach().contiguous().numpy() for name, x in zip(self.input_names, inputs)}
        return [torch.from_numpy(out) for out in self.session.run(None, feed)]

    def write_library(self, folder: Path, stem: str, fmt: str) -> str:
        name = f"{stem}.onnx"
        (folder / name).write_bytes(self.graph_bytes)
        return name


def check_exportable(graph: Graph) -> None:
    """Raise LoweringError for an op that passes insert (``fxpress::...``): ONNX has no form of it."""
    for node in graph.module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        namespace = node.target.namespace
        if namespace not in ("aten", "prims"):
            raise LoweringError(f"op {namespace}::{node.target._schema.name.partition('::')[2]} at node "
                                f"{node.format_node()} has no ONNX form; compile this graph with target "
                                f"'llvm' (TVM lowers it) instead of 'onnx'")


def export_onnx(graph: Graph, dynamic: bool) -> tuple[object, FlatExport]:
    """The ONNX ModelProto of `graph` (opset chosen by torch.onnx) and the flat export it came from."""
    check_exportable(graph)
    flat = export_flat(graph, dynamic, "onnx", prepare=fix_for_onnx)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(flat.program, flat.example_inputs, dynamo=True, verbose=False,
                                        optimize=False)  # onnxscript's optimizer emits rank-3 Gemm (invalid)
    except Exception as err:  # noqa: BLE001 - the exporter raises many kinds
        raise LoweringError(f"cannot export graph {graph.name} to ONNX: {_export_cause(err)}") from err
    return program.model_proto, flat


def _export_cause(err: BaseException) -> str:
    """The line of torch.onnx's (multi-line, coloured) message that says what failed."""
    while err.__cause__ is not None and "ConversionError" in type(err).__name__:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {(lines[0] if lines else '')[:400]}"


def build_onnx(graph: Graph, *, dynamic: bool = False) -> tuple[OnnxExecutable, list[TensorSpec], IOStructure]:
    model, flat = export_onnx(graph, dynamic)
    params = _split_initializers(model)
    log.info("exported %s to ONNX: %d nodes, %d initializers", graph.name, len(model.graph.node), len(params))
    return OnnxExecutable(model, params), flat.inputs, flat.structure


def load_from_manifest(folder: Path, manifest: dict, params: dict[str, np.ndarray]) -> OnnxExecutable:
    import onnx

    try:
        model = onnx.load_model_from_string((folder / manifest["library"]).read_bytes())
    except Exception as err:  # noqa: BLE001 - a damaged protobuf
        raise ArtifactError(f"cannot parse {folder / manifest['library']}: {err}") from err
    return OnnxExecutable(model, params)
