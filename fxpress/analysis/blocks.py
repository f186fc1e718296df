"""Repeated residual blocks of a graph: discovery, removal, and a runner that sees their boundaries.

Discovery works from graph structure and module paths, not class names:

1. every op node's module path is split at integer components:
   ``model.model.layers.7.self_attn.q_proj`` is a candidate block ``7`` of
   the stack ``model.model.layers``; a stack needs >= 2 blocks;
2. a block's region is its op nodes (owned by ``<prefix>.<i>`` or its
   children; ``get_attr`` nodes are not part of a region, so blocks that
   read another block's weights after ``share-weights`` still qualify);
3. side inputs are values produced outside the blocks and read by every
   block (attention masks, rotary cos/sin); the block's hidden output is
   the largest region node read outside, its hidden input the outside value
   of the same rank, dtype and width (the token count may differ: a block
   that merges tokens shortens the stream); any other value that leaves a
   block is carried state (merge-tokens' token sizes), paired with the
   block's other outside input of the same rank, dtype and width;
4. the blocks chain: block k+1 reads block k's output.

A graph may hold several stacks (say an encoder and a decoder);
:func:`find_blocks` returns the one with the most MACs, or None.
Blocks are recorded by node name, so a stack found on a graph also
applies to its copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch.fx import Node

from fxpress.analysis.attention import find_attention_cores, find_transformer_blocks
from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph
from fxpress.ir.rewrite import ancestors

_NOT_OPS = ("placeholder", "get_attr", "output")
_UNUSED = object()  # stands for a value a resumed run never reads


@dataclass(frozen=True)
class Block:
    """One residual block: its op nodes, hidden input and output (node names)."""

    position: int  # 0..n-1 in the stack, in graph order
    path: str  # module path, e.g. "model.model.layers.7"
    label: int  # the integer in the path (the original layer index)
    nodes: tuple[str, ...]  # op nodes of the region, in graph order
    input: str
    output: str
    params: tuple[str, ...]  # attribute paths the region reads
    carried: tuple[tuple[str | None, str], ...] = ()  # (input, output) of state besides the hidden stream
    attention: str | None = None  # the block's attention core (softmax or SDPA node), when it has one


@dataclass(frozen=True)
class BlockStack:
    """Repeated residual blocks under one module path prefix."""

    prefix: str  # e.g. "model.model.layers"
    blocks: tuple[Block, ...]
    side_inputs: tuple[str, ...]
    macs: int

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def paths(self) -> list[str]:
        return [b.path for b in self.blocks]

    def describe(self) -> str:
        side = ", ".join(self.side_inputs) or "none"
        return f"{len(self.blocks)} blocks under {self.prefix or '<top>'} (side inputs: {side})"


def _block_key(path: str) -> list[tuple[str, int, str]]:
    """(prefix, index, block path) for every integer component of a module path."""
    parts = path.split(".") if path else []
    return [(".".join(parts[:j]), int(p), ".".join(parts[:j + 1])) for j, p in enumerate(parts) if p.isdigit()]


def _regions(graph: Graph) -> dict[str, dict[int, tuple[str, list[Node]]]]:
    """prefix -> {index: (block path, op nodes in graph order)}, prefixes with >= 2 blocks."""
    found: dict[str, dict[int, tuple[str, list[Node]]]] = {}
    for node in graph.fx.nodes:
        if node.op in _NOT_OPS:
            continue
        for prefix, index, path in _block_key(graph.info(node).module_path):
            found.setdefault(prefix, {}).setdefault(index, (path, []))[1].append(node)
    return {p: dict(sorted(v.items())) for p, v in found.items() if len(v) >= 2}


def _outside_inputs(region: list[Node]) -> list[Node]:
    members, seen = set(region), {}
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in members and arg.op != "get_attr":
                seen.setdefault(arg, None)
    return list(seen)


def _same_shape(graph: Graph, a: Node, b: Node) -> bool:
    return graph.info(a).shape == graph.info(b).shape


def _compatible(graph: Graph, a: Node, b: Node) -> bool:
    """Same dtype, rank and last dim: the same stream, whatever its token count."""
    first, second = graph.info(a), graph.info(b)
    return (first.shape is not None and second.shape is not None and first.dtype == second.dtype
            and len(first.shape) == len(second.shape) and first.shape[-1:] == second.shape[-1:])


def _numel(graph: Graph, node: Node) -> int:
    shape = graph.info(node).shape
    return math.prod(shape) if shape is not None else -1


def _pair_input(graph: Graph, output: Node, inputs: list[Node]) -> Node | None:
    """The outside input that carries the same state as `output`: same shape first, else compatible."""
    for accept in (_same_shape, _compatible):
        found = [a for a in inputs if accept(graph, a, output)]
        if len(found) == 1:
            return found[0]
        if found:
            return max(found, key=lambda a: _numel(graph, a))
    return None


def _build_block(graph: Graph, position: int, label: int, path: str, region: list[Node],
                 shared: set[Node], reasons: list[str]) -> Block | None:
    members = set(region)
    outputs = [n for n in region if any(u not in members for u in n.users)]
    if not outputs or any(graph.info(n).shape is None for n in outputs):
        reasons.append(f"{path}: no tensor leaves the block")
        return None
    hidden_out = max(outputs, key=lambda n: _numel(graph, n))
    inputs = [a for a in _outside_inputs(region) if a not in shared]
    hidden_in = _pair_input(graph, hidden_out, inputs)
    if hidden_in is None:
        reasons.append(f"{path}: no input outside the block matches its output {graph.info(hidden_out).shape}")
        return None
    rest = [a for a in inputs if a is not hidden_in]
    carried = []
    for output in (n for n in outputs if n is not hidden_out):
        source = _pair_input(graph, output, rest)
        if source is not None:
            rest.remove(source)
        carried.append((None if source is None else source.name, output.name))
    params = sorted({str(a.target) for n in region for a in n.all_input_nodes if a.op == "get_attr"})
    return Block(position, path, label, tuple(n.name for n in region), hidden_in.name, hidden_out.name,
                 tuple(params), tuple(carried))


def _build_stack(graph: Graph, prefix: str, regions: dict[int, tuple[str, list[Node]]],
                 reasons: list[str]) -> BlockStack | None:
    inputs = [set(_outside_inputs(nodes)) for _, nodes in regions.values()]
    shared = set.intersection(*inputs)
    blocks = []
    for position, (label, (path, nodes)) in enumerate(regions.items()):
        block = _build_block(graph, position, label, path, nodes, shared, reasons)
        if block is None:
            return None
        blocks.append(block)
    if any(b.input != a.output for a, b in zip(blocks, blocks[1:])):
        reasons.append(f"{prefix}: blocks do not chain (block k+1 must read block k's output)")
        return None
    order = {n.name: i for i, n in enumerate(graph.fx.nodes)}
    side = tuple(sorted((n.name for n in shared), key=order.__getitem__))
    macs = sum(graph.info(n).macs for _, nodes in regions.values() for n in nodes)
    return BlockStack(prefix, tuple(blocks), side, macs)


def _attention_regions(graph: Graph) -> dict[int, tuple[str, list[Node]]]:
    """Blocks found by the attention pattern: each block's ops between the stream entering it and its output."""
    regions = {}
    for block in find_transformer_blocks(graph):
        inside = ancestors(block.output) | {block.output}
        upstream = ancestors(block.stream_in) | {block.stream_in}
        nodes = [n for n in graph.fx.nodes if n in inside and n not in upstream and n.op not in _NOT_OPS]
        regions[block.index] = (block.path or f"<attention {block.index}>", nodes)
    return regions


def _annotate_attention(graph: Graph, stack: BlockStack) -> BlockStack:
    """Name each block's attention core (the pattern's finding, recorded on the module-path block)."""
    cores = {core.node.name for core in find_attention_cores(graph)}
    blocks = tuple(replace(b, attention=next((n for n in b.nodes if n in cores), None)) for b in stack.blocks)
    return replace(stack, blocks=blocks)


def find_block_stacks(graph: Graph, reasons: list[str] | None = None) -> list[BlockStack]:
    """Every stack of >= 2 chained residual blocks, most MACs first; why candidates failed goes to `reasons`.

    Module paths first; where they give no stack (a graph whose nodes lost their module paths, blocks
    not held in a numbered container), the attention pattern's blocks, if they chain.
    """
    reasons = [] if reasons is None else reasons
    stacks = [s for prefix, regions in _regions(graph).items()
              if (s := _build_stack(graph, prefix, regions, reasons)) is not None]
    if not stacks:
        regions = _attention_regions(graph)
        found = _build_stack(graph, "<attention pattern>", regions, reasons) if len(regions) >= 2 else None
        stacks = [found] if found is not None else []
    return sorted((_annotate_attention(graph, s) for s in stacks), key=lambda s: (-s.macs, s.prefix))


def no_blocks_reason(graph: Graph) -> str:
    """Why `graph` has no stack of repeated residual blocks, in one line (for a pass's stats)."""
    reasons: list[str] = []
    find_block_stacks(graph, reasons)
    if not _regions(graph):
        return ("no repeated residual blocks: no module path has >= 2 numbered children with ops "
                "(capture with torch.export so nodes keep their module paths)")
    return "no repeated residual blocks: " + "; ".join(reasons)


def find_blocks(graph: Graph) -> BlockStack | None:
    """The main stack of repeated residual blocks (most MACs), or None when the graph has none."""
    stacks = find_block_stacks(graph)
    return stacks[0] if stacks else None


def remove_blocks(graph: Graph, stack: BlockStack, positions: Iterable[int]) -> list[str]:
    """blocks[p](x) -> x for each position, in place on a graph the caller owns (a copy).

    The block's output is replaced by its input outside the block, its nodes
    are erased, then unread get_attr nodes and tensors.  Call
    ``graph.recompile()`` afterwards.  Returns the removed block paths.
    """
    nodes = {n.name: n for n in graph.fx.nodes}
    removed = []
    for position in sorted(set(positions), reverse=True):  # later blocks first: inputs stay alive
        block = stack.blocks[position]
        region = [nodes[name] for name in block.nodes]
        members = set(region)
        for source, output in ((block.input, block.output), *block.carried):
            if source is None:
                raise PreconditionError(
                    f"block {block.path} produces {nodes[output].format_node()}, which later blocks read, "
                    "and reads no matching value, so it cannot be removed")
            nodes[output].replace_all_uses_with(nodes[source], delete_user_cb=lambda u: u not in members)
        for node in reversed(region):
            graph.fx.erase_node(node)
        removed.append(block.path)
    for node in list(graph.fx.nodes):
        if node.op == "get_attr" and not node.users:
            graph.fx.erase_node(node)
    graph.remove_unused_attributes()
    return sorted(removed, key=lambda p: stack.paths.index(p))


Transform = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def comparable(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two values of a block boundary made comparable: as they are when their shapes agree, else (a block
    that merges tokens: (B, N, C) in, (B, N', C) out) their means over the token axis (1)."""
    if x.shape == y.shape:
        return x, y
    if x.dim() == y.dim() >= 2 and x.shape[0] == y.shape[0] and x.shape[2:] == y.shape[2:]:
        return x.mean(1), y.mean(1)
    raise ValueError(f"block boundary values of shapes {list(x.shape)} and {list(y.shape)} cannot be compared")


class BlockRunner(torch.fx.Interpreter):
    """Runs a graph and sees every block boundary: records, skips or transforms block outputs.

    ``skip``: positions whose blocks are not run (output := input).
    ``transform(position, x, y)``: replaces a block's output y (x is its input),
    e.g. a gate ``x + g * (y - x)``.  With ``record``, ``inputs[p]`` and
    ``outputs[p]`` hold every block's boundary values after a run, and
    ``skeleton`` the values outside the blocks that a resumed run needs.
    """

    def __init__(self, graph: Graph, stack: BlockStack, *, skip: Iterable[int] = (),
                 transform: Transform | None = None, record: bool = False):
        carried = any(b.carried for b in stack.blocks)
        super().__init__(graph.module, garbage_collect_values=not carried)  # skipped blocks pass state on
        self.graph_ = graph
        self.stack = stack
        self.transform = transform
        self.record = record
        nodes = {n.name: n for n in graph.fx.nodes}
        self._output_of = {nodes[b.output]: b.position for b in stack.blocks}
        self._input_of: dict[Node, list[int]] = {}
        for block in stack.blocks:
            self._input_of.setdefault(nodes[block.input], []).append(block.position)
        self._skip_positions = set(skip)
        self._skipped = {nodes[name]: b.position for b in stack.blocks if b.position in self._skip_positions
                         for name in b.nodes}
        self._carried_source = {nodes[out]: nodes[src] for b in stack.blocks if b.position in self._skip_positions
                                for src, out in b.carried if src is not None}
        in_blocks = {nodes[name] for b in stack.blocks for name in b.nodes}
        last = nodes[stack.blocks[-1].output]
        before_last = []
        for node in graph.fx.nodes:
            if node is last:
                break
            before_last.append(node)
        self._keep = {n for n in before_last if n not in in_blocks and n.op != "get_attr"}
        self._stash: dict[int, Any] = {}
        self.inputs: dict[int, Any] = {}
        self.outputs: dict[int, Any] = {}
        self.skeleton: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        position = self._skipped.get(n)
        if position is not None:
            if n in self._carried_source:  # a skipped block passes its carried state through
                return self.env[self._carried_source[n]]
            if n not in self._output_of:
                return None
            value = self._stash[position]
        else:
            value = super().run_node(n)
        if self.record and n in self._keep:
            self.skeleton[n] = value
        if n in self._output_of:
            value = self._leave(self._output_of[n], value)
        for pos in self._input_of.get(n, ()):
            self._stash[pos] = value
        return value

    def _leave(self, position: int, value: Any) -> Any:
        block_input = self._stash.pop(position)
        if self.transform is not None and position not in self._skip_positions:
            value = self.transform(position, block_input, value)
        if self.record:
            self.inputs[position], self.outputs[position] = block_input, value
        return value

    def __call__(self, *inputs: Any) -> Any:
        flat, _ = torch.utils._pytree.tree_flatten(list(inputs))
        return self.run(*flat)

    def resume(self, position: int, skeleton: dict[Node, Any], block_input: Any) -> Any:
        """Run from block `position` on, given a recorded run's skeleton and that block's input.

        The graph before the block is not run again.  Raises ValueError when
        the recorded values do not cover what the rest of the graph reads.
        """
        nodes = {n.name: n for n in self.graph_.fx.nodes}
        block = self.stack.blocks[position]
        start, entry = nodes[block.nodes[0]], nodes[block.input]
        env: dict[Node, Any] = {}
        for node in self.graph_.fx.nodes:
            if node is start:
                break
            if node.op == "get_attr":
                env[node] = self.fetch_attr(str(node.target))
            elif node is entry:
                env[node] = block_input
            else:
                env[node] = skeleton.get(node, _UNUSED)
        missing = [n for n, v in env.items() if v is _UNUSED and any(u not in env for u in n.users)]
        if missing:
            raise ValueError(f"cannot resume at block {block.path}: {missing[0].format_node()} is needed")
        for pos in self._input_of.get(entry, ()):
            self._stash[pos] = block_input
        return self.graph_.fx.process_outputs(self.run(initial_env=env, enable_io_processing=False))
