"""Deterministic dumps of a `Graph`: text, Graphviz DOT and JSON.

The text form is the one the tests and the dump instrument diff:

    graph MLP (export): nodes=27 params=2,276 bytes=9,104 macs=21,120
    %x = input : f32[2,5,16]  # <top>
    %linear = aten.linear(%layer_norm, %blocks_0_fc1_weight, %blocks_0_fc1_bias) : f32[2,5,32]
        # blocks.0.fc1 (Linear) macs=5120    <- same line in the dump
    return (%linear_4,)

Every node is one line, in graph order, named by its FX name, with its
output type(s), owning module path and class, and MACs.  Nothing in it
depends on ids, addresses or hash order, so the same graph prints the same
bytes in any process.  `collapse=k` prints one line per run of nodes owned
by the same module truncated to k path components, for models with
thousands of nodes.

`write_dump` writes these forms to files; formats that need the layers
above ir (Model Explorer JSON, ONNX, .pt2) come in as `writers` from
:mod:`fxpress.export.graph_files`.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.fx

from fxpress.errors import FxpressError
from fxpress.ir.graph import Graph, NodeInfo, dtype_name
from fxpress.ir.views import NodeGroup, module_types, node_groups, target_name

log = logging.getLogger(__name__)

TOP = "<top>"  # how the root module's path "" is shown
DUMP_FORMATS = ("txt", "dot", "json", "svg", "png")
RENDER_FORMATS = ("svg", "png")
# A writer for a format the printer does not know: (graph, folder, stem) -> the path it wrote.
# fxpress.export passes its own (Model Explorer, ONNX, .pt2) to write_dump; the printer imports nothing above ir.
GraphFileWriter = Callable[[Graph, Path, str], Path]


# -- values -----------------------------------------------------------------------------
def type_text(shape: tuple[int, ...] | None, dtype: str | None) -> str:
    """`f32[2,5,16]` for a tensor, `f32[]` for a scalar tensor, "" for no tensor."""
    if shape is None:
        return ""
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


def output_text(record: NodeInfo) -> str:
    """All tensor outputs of a node: `f32[2,4]` or `(f32[2,4], f32[2,4])`."""
    first = type_text(record.shape, record.dtype)
    if not record.extra_outputs:
        return first
    rest = [type_text(shape, dtype) for shape, dtype in record.extra_outputs]
    return f"({', '.join([first] + rest)})"


def format_arg(value: Any) -> str:
    """Compact, deterministic text for a node argument (never an id or address)."""
    if isinstance(value, torch.fx.Node):
        return f"%{value.name}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, tuple):
        inner = ", ".join(format_arg(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return f"[{', '.join(format_arg(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{format_arg(k)}: {format_arg(v)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, (torch.device, torch.layout, torch.memory_format)):
        return str(value).replace("torch.", "")
    if isinstance(value, torch.Tensor):
        return f"tensor({type_text(tuple(value.shape), dtype_name(value.dtype))})"
    if isinstance(value, slice):
        return f"slice({format_arg(value.start)}, {format_arg(value.stop)}, {format_arg(value.step)})"
    if value is Ellipsis:
        return "..."
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    return f"<{type(value).__name__}>"


def _call_args(node: torch.fx.Node) -> str:
    parts = [format_arg(a) for a in node.args]
    parts += [f"{key}={format_arg(value)}" for key, value in node.kwargs.items()]
    return ", ".join(parts)


# -- text ---------------------------------------------------------------------------------
def format_header(graph: Graph) -> str:
    """`graph NAME (SOURCE): nodes=.. params=.. bytes=.. macs=..`"""
    figures = graph.figures()
    return (f"graph {graph.name} ({graph.source}): nodes={figures['nodes']} "
            f"params={figures['params']:,} bytes={figures['bytes']:,} macs={figures['macs']:,}")


def _attr_kind(graph: Graph, node: torch.fx.Node) -> str:
    value = graph.attribute(str(node.target))
    if isinstance(value, torch.nn.Parameter):
        return "param"
    return "buffer" if isinstance(value, torch.Tensor) else "attr"


def _op_text(graph: Graph, node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return "input" + (f"(default={format_arg(node.args[0])})" if node.args else "")
    if node.op == "get_attr":
        return f"{_attr_kind(graph, node)} {node.target}"
    if node.op == "call_function":
        return f"{target_name(node)}({_call_args(node)})"
    if node.op == "call_method":
        return f"method {node.target}({_call_args(node)})"
    if node.op == "call_module":
        return f"call {node.target}({_call_args(node)})"
    return f"{node.op} {target_name(node)}({_call_args(node)})"


def format_node(graph: Graph, node: torch.fx.Node) -> str:
    """One line: `%name = op(args) : type  # module.path (Class) macs=N`."""
    if node.op == "output":
        return f"return {', '.join(format_arg(a) for a in node.args)}"
    record = graph.info(node)
    line = f"%{node.name} = {_op_text(graph, node)}"
    types = output_text(record)
    if types:
        line += f" : {types}"
    line += f"  # {record.module_path or TOP}"
    if record.module_type:
        line += f" ({record.module_type})"
    if record.macs:
        line += f" macs={record.macs}"
    return line


def format_group(graph: Graph, group: NodeGroup) -> str:
    """One line for a run of nodes.

    `blocks.0  (Block)  nodes=5 params=1,104 macs=10,240  out: %add f32[2,5,16]`
    """
    last = group.nodes[-1]
    out = f"%{last.name} {output_text(graph.info(last))}".rstrip()
    kind = f"  ({group.module_type})" if group.module_type else ""
    return (f"{group.path or TOP}{kind}  nodes={len(group.nodes)} params={group.params:,} "
            f"macs={group.macs:,}  out: {out}")


def format_graph(graph: Graph, *, collapse: int | None = None, show_params: bool = True) -> str:
    """The graph as text: a header line, then one line per node in graph order.

    collapse=k prints one line per run of op nodes owned by the same module
    truncated to k components (parameter reads folded into the run's params);
    inputs and the return stay one line each.  show_params=False leaves out
    the parameter/buffer (get_attr) lines of the full form.
    """
    if collapse is not None:
        return _format_collapsed(graph, collapse)
    lines = [format_header(graph)] + ([f"# captured as {graph.wrapper}"] if graph.wrapper else [])
    for node in graph.fx.nodes:
        if node.op == "get_attr" and not show_params:
            continue
        lines.append(format_node(graph, node))
    return "\n".join(lines) + "\n"


def _format_collapsed(graph: Graph, depth: int) -> str:
    if depth < 1:
        raise FxpressError(f"collapse must be a positive module depth, got {depth}")
    lines = [f"{format_header(graph)} collapse={depth}"] + ([f"# captured as {graph.wrapper}"] if graph.wrapper else [])
    lines += [format_node(graph, n) for n in graph.fx.nodes if n.op == "placeholder"]
    lines += [format_group(graph, group) for group in node_groups(graph, depth)]
    lines += [format_node(graph, n) for n in graph.fx.nodes if n.op == "output"]
    return "\n".join(lines) + "\n"


# -- DOT ----------------------------------------------------------------------------------
def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _quote(text: str) -> str:
    return f'"{_escape(text)}"'


def _label(lines: list[str]) -> str:
    """A quoted DOT label with one text line per non-empty entry."""
    return '"' + "\\n".join(_escape(line) for line in lines if line) + '"'


def _with_ext(path: Path, ext: str) -> Path:
    """`path` with its dump extension replaced by `ext`, or `ext` appended (stems may hold dots)."""
    if path.suffix in (".dot",) + tuple(f".{f}" for f in RENDER_FORMATS):
        return path.with_suffix(ext)
    return path.with_name(path.name + ext)


def _dot_node_lines(graph: Graph, node: torch.fx.Node) -> list[str]:
    record = graph.info(node)
    op = {"placeholder": "input", "output": "output", "call_method": f"method {node.target}",
          "call_module": f"call {node.target}"}.get(node.op, target_name(node))
    lines = [node.name, op, output_text(record)] if node.op != "output" else ["output"]
    for source in node.all_input_nodes:
        if source.op == "get_attr":
            folded = graph.info(source)
            lines.append(f"{str(source.target).rpartition('.')[2]}: {type_text(folded.shape, folded.dtype)}")
    if record.macs:
        lines.append(f"macs={record.macs:,}")
    return lines


def _group_label(graph: Graph, group: NodeGroup) -> str:
    last = graph.info(group.nodes[-1])
    return _label([group.path or TOP, f"({group.module_type})" if group.module_type else "",
                   f"nodes={len(group.nodes)} params={group.params:,} macs={group.macs:,}",
                   output_text(last)])


def _dot_vertices(graph: Graph, collapse: int | None) -> tuple[list[tuple[str, str, str]], dict]:
    """(id, label, cluster path) per DOT vertex, and the FX node -> vertex id map.

    get_attr nodes get no vertex (they are folded into labels); with
    `collapse`, each run of op nodes is one vertex in its parent module's cluster.
    """
    vertices: list[tuple[str, str, str]] = []
    owner: dict[torch.fx.Node, str] = {}
    groups = node_groups(graph, collapse) if collapse is not None else []
    group_of = {node: i for i, group in enumerate(groups) for node in group.nodes}
    for node in graph.fx.nodes:
        if node.op == "get_attr":
            continue
        if node in group_of:
            group = groups[group_of[node]]
            owner[node] = f"group.{group_of[node]}"  # FX names never hold dots
            if node is group.nodes[0]:
                vertices.append((owner[node], _group_label(graph, group), group.path.rpartition(".")[0]))
            continue
        owner[node] = node.name
        path = graph.info(node).module_path if node.op not in ("placeholder", "output") else ""
        vertices.append((node.name, _label(_dot_node_lines(graph, node)), path))
    return vertices, owner


def _emit_cluster(path: str, tree: dict, members: dict, types: dict, indent: str, out: list[str]) -> None:
    for vertex_id, label in members.get(path, []):
        out.append(f"{indent}{_quote(vertex_id)} [label={label}];")
    for child in tree.get(path, []):
        title = f"{child} ({types[child]})" if types.get(child) else child
        out.append(f"{indent}subgraph {_quote('cluster_' + child)} {{")
        out.append(f"{indent}  label={_quote(title)};")
        _emit_cluster(child, tree, members, types, indent + "  ", out)
        out.append(f"{indent}}}")


def to_dot(graph: Graph, *, collapse: int | None = None) -> str:
    """Graphviz DOT text: one vertex per node (or per collapsed run), a cluster per module.

    Parameter reads are folded into their consumer's label.  Clusters nest
    along module paths and appear in graph order.
    """
    vertices, owner = _dot_vertices(graph, collapse)
    members: dict[str, list[tuple[str, str]]] = {}
    tree: dict[str, list[str]] = {}
    for vertex_id, label, path in vertices:
        members.setdefault(path, []).append((vertex_id, label))
        parts = path.split(".") if path else []
        for i in range(len(parts)):
            parent, child = ".".join(parts[:i]), ".".join(parts[: i + 1])
            if child not in tree.setdefault(parent, []):
                tree[parent].append(child)
    out = [f"digraph {_quote(graph.name)} {{",
           f"  graph [label={_quote(format_header(graph))}, labelloc=t, fontname=Helvetica];",
           "  node [shape=box, style=rounded, fontname=Helvetica, fontsize=10];"]
    _emit_cluster("", tree, members, module_types(graph), "  ", out)
    edges: dict[tuple[str, str], None] = {}
    for node, target in owner.items():
        for source in node.all_input_nodes:
            if source in owner and owner[source] != target:
                edges[(owner[source], target)] = None
    out += [f"  {_quote(a)} -> {_quote(b)};" for a, b in edges]
    out.append("}")
    return "\n".join(out) + "\n"


def render_dot(dot_text: str, path: str | Path, fmt: str = "svg") -> Path:
    """Write `dot_text` next to `path` as .dot and render it with graphviz to `path` as `fmt`.

    Raises FxpressError when graphviz' `dot` is not installed or fails; the
    .dot file is written either way.
    """
    if fmt not in RENDER_FORMATS:
        raise FxpressError(f"cannot render DOT as {fmt!r}; use one of {', '.join(RENDER_FORMATS)}")
    target = _with_ext(Path(path), f".{fmt}")
    dot_path = _with_ext(Path(path), ".dot")
    dot_path.parent.mkdir(parents=True, exist_ok=True)
    dot_path.write_text(dot_text)
    exe = shutil.which("dot")
    if exe is None:
        raise FxpressError(f"graphviz 'dot' is not installed: apt-get install graphviz; "
                           f"the .dot file was written to {dot_path}")
    try:
        done = subprocess.run([exe, f"-T{fmt}", str(dot_path), "-o", str(target)],
                              capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired as err:
        raise FxpressError(f"graphviz 'dot' ran over 300 s on {dot_path}; try collapse=1 or 2") from err
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise FxpressError(f"graphviz 'dot' failed on {dot_path} (exit {done.returncode}): {reason}")
    return target


# -- JSON ---------------------------------------------------------------------------------
def _json_arg(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_json_arg(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_arg(v) for k, v in value.items()}
    return {"repr": format_arg(value)}


def _node_json(graph: Graph, node: torch.fx.Node, index: dict[torch.fx.Node, int]) -> dict:
    record = graph.info(node)
    return {
        "name": node.name, "op": node.op, "target": target_name(node),
        "args": _json_arg(node.args), "kwargs": _json_arg(dict(node.kwargs)),
        "shape": list(record.shape) if record.shape is not None else None, "dtype": record.dtype,
        "extra_outputs": [{"shape": list(s), "dtype": d} for s, d in record.extra_outputs],
        "module_path": record.module_path, "module_type": record.module_type,
        "params": list(record.params), "macs": record.macs,
        "users": [user.name for user in sorted(node.users, key=index.__getitem__)],
    }


def to_json(graph: Graph) -> dict:
    """A JSON-serialisable dict: name, source, figures, and one record per node in graph order.

    Node arguments that are nodes appear as {"node": name}; literals as JSON
    values; anything else as {"repr": text}.
    """
    index = {node: i for i, node in enumerate(graph.fx.nodes)}
    return {"name": graph.name, "source": graph.source, "figures": graph.figures(),
            "nodes": [_node_json(graph, node, index) for node in graph.fx.nodes]}


def format_json(graph: Graph) -> str:
    """`to_json` as stable, diffable text: sorted keys, one line per node, trailing newline."""
    data = to_json(graph)
    fields = []
    for key in sorted(data):
        if key == "nodes":
            rows = ",\n".join(f"  {json.dumps(node, sort_keys=True)}" for node in data[key])
            fields.append(f' "nodes": [\n{rows}\n ]')
        else:
            fields.append(f" {json.dumps(key)}: {json.dumps(data[key], sort_keys=True)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


# -- dumps --------------------------------------------------------------------------------
def dump_formats(writers: Mapping[str, GraphFileWriter] | None = None) -> tuple[str, ...]:
    """Every format `write_dump` takes: the printer's own, then those `writers` add."""
    return DUMP_FORMATS + tuple(fmt for fmt in (writers or {}) if fmt not in DUMP_FORMATS)


def check_dump_formats(formats: tuple[str, ...] | list[str],
                       writers: Mapping[str, GraphFileWriter] | None = None) -> tuple[str, ...]:
    """`formats` without repeats; FxpressError naming every allowed format when one is unknown or none is given."""
    allowed = dump_formats(writers)
    unknown = [fmt for fmt in formats if fmt not in allowed]
    if unknown or not formats:
        given = ", ".join(repr(fmt) for fmt in unknown) or "none"
        raise FxpressError(f"unknown dump format {given}; use any of {', '.join(allowed)} (comma-separated)")
    return tuple(dict.fromkeys(formats))


def write_dump(graph: Graph, directory: str | Path, stem: str, formats: tuple[str, ...] = ("txt",),
               *, collapse: int | None = None, writers: Mapping[str, GraphFileWriter] | None = None) -> list[Path]:
    """Write `stem.txt` / `.dot` / `.json` / `.svg` / `.png` into `directory`; return the paths written.

    When svg or png is asked for and graphviz is missing (or fails), the .dot
    file is written instead and a warning is logged.  `writers` adds formats
    by name (fxpress.export.graph_files: model-explorer, onnx, pt2); every
    format is checked before anything is written.
    """
    formats = check_dump_formats(formats, writers)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    texts = {"txt": lambda: format_graph(graph, collapse=collapse), "json": lambda: format_json(graph),
             "dot": lambda: to_dot(graph, collapse=collapse)}
    for fmt in formats:
        if fmt in texts:
            path = folder / f"{stem}.{fmt}"
            path.write_text(texts[fmt]())
        elif fmt in RENDER_FORMATS:
            path = _render_or_warn(to_dot(graph, collapse=collapse), folder / stem, fmt)
        else:
            path = writers[fmt](graph, folder, stem)
        if path not in written:
            written.append(path)
    return written


def _render_or_warn(dot_text: str, base: Path, fmt: str) -> Path:
    try:
        return render_dot(dot_text, base, fmt)
    except FxpressError as err:
        log.warning("could not render %s.%s: %s", base.name, fmt, err)
        return _with_ext(base, ".dot")
