"""Width units of a graph: the heads, key/value heads, MLP neurons and hidden channels a width pass may remove.

Found through the dimension flow, never by module names, so any captured
transformer works:

- attention: each `scaled_dot_product_attention` in a residual block; query
  head h's group is the dimension group of the attention output's head axis
  (q rows, o_proj columns), key/value head j's the group of the key tensor
  before grouped-query repetition (k and v rows and every query head that
  reads it).  The *reader* is the linear that contracts the heads (o_proj):
  its weight columns of head h are where head h's output enters the
  residual stream.
- MLP: a block linear whose output channels couple only to parameters of
  the same block, through no attention, and are contracted by another block
  linear (the reader, down_proj): neuron i is output row i of the producers
  (gate_proj, up_proj) and column i of the reader.
- hidden: the output channels of the token embedding, coupled to every norm,
  residual add and layer that reads the residual stream.

Each family lists, per unit, its parameter slices (for magnitude and Taylor
scores) and the reader columns it occupies (for activation and contribution
scores, computed from the reader's recorded input).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from fxpress.analysis.blocks import Block, BlockStack
from fxpress.analysis.dimension_flow import DimensionGroup, ParamSlice, channel_group, dimension_group, kv_source
from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph, shape_of
from fxpress.ir.opinfo import op_info

aten = torch.ops.aten


@dataclass
class UnitFamily:
    """Units of one kind in one block (or the whole graph, for hidden channels)."""

    kind: str  # "heads" | "mlp" | "hidden"
    scope: str  # block module path, or "model" for hidden channels
    size: int
    seed: Node  # the tensor whose `axis` indexes the units
    axis: int
    unit_slices: list[list[ParamSlice]]  # per unit: the parameter slices removed with it
    readers: list[tuple[Node, list[list[int]]]]  # (linear, per-unit in-feature columns) that read the units

    def params(self) -> set[str]:
        return {s.path for unit in self.unit_slices for s in unit}


@dataclass
class AttentionUnits:
    """One attention's query heads (a `UnitFamily`) and its grouped-query structure."""

    heads: UnitFamily
    kv_seed: Node  # key tensor before repetition; axis `heads.axis`-like head axis below
    kv_axis: int
    kv_heads: int
    group_of: list[int] = field(default_factory=list)  # query head -> its key/value head

    @property
    def group_size(self) -> int:
        return self.heads.size // self.kv_heads


def _linear_weights(graph: Graph) -> dict[str, list[Node]]:
    """Attribute path of a linear's weight -> the linear nodes reading it (several when blocks share it)."""
    found: dict[str, list[Node]] = {}
    for node in graph.fx.nodes:
        if node.op == "call_function" and node.target == aten.linear.default:
            weight = node.args[1]
            if isinstance(weight, Node) and weight.op == "get_attr":
                found.setdefault(str(weight.target), []).append(node)
    return found


def _readers(group: DimensionGroup, linears: dict[str, list[Node]], names: set[str] | None = None
             ) -> list[tuple[Node, list[int]]]:
    """Linears (of `names`, when given) whose in-features (weight dim 1) the group removes, with those columns."""
    return [(linear, list(s.indices)) for s in group.slices if s.dim == 1
            for linear in linears.get(s.path, ()) if names is None or linear.name in names]


def _shifted(slices: list[ParamSlice], offset: int) -> list[ParamSlice]:
    return [ParamSlice(s.path, s.dim, tuple(i + offset for i in s.indices), s.rank) for s in slices]


_PASS_THROUGH = {aten.dropout.default, aten.to.dtype, aten.clone.default, aten.contiguous.default}
_MATMULS = {aten.matmul.default, aten.bmm.default}


def _after_softmax(node: object) -> bool:
    while isinstance(node, Node) and node.target in _PASS_THROUGH:
        node = node.args[0]
    return isinstance(node, Node) and getattr(op_info(node.target), "category", "") == "softmax"


def attention_cores(graph: Graph, names: set[str]) -> list[Node]:
    """The attention outputs (..., heads, tokens, head_dim) among `names`: SDPA nodes, or for attention
    written with matmul, the product of the softmax with the values."""
    cores = [n for n in graph.fx.nodes if n.name in names and n.target == aten.scaled_dot_product_attention.default]
    if not cores:
        cores = [n for n in graph.fx.nodes if n.name in names and n.target in _MATMULS and
                 len(shape_of(n)) >= 4 and _after_softmax(n.args[0])]
    return cores


def attention_units(graph: Graph, block: Block, pass_name: str | None = None) -> list[AttentionUnits]:
    """The attention(s) of one block with per-head groups; [] when it has none the head axis can be found in."""
    names = set(block.nodes)
    linears = _linear_weights(graph)
    found = []
    for sdpa in attention_cores(graph, names):
        rank = len(shape_of(sdpa))
        heads = shape_of(sdpa)[rank - 3]
        if heads < 2:
            raise PreconditionError(f"{sdpa.format_node()} has a single head: there is no head to prune (its "
                                    "group is the whole attention); prune mlp/embed instead", pass_name)
        groups = [dimension_group(graph, sdpa, rank - 3, [h], pass_name=pass_name) for h in range(heads)]
        if sdpa.target == aten.scaled_dot_product_attention.default:
            key = kv_source(sdpa)
            kv_axis = len(shape_of(key)) - 3
            kv_heads = shape_of(key)[kv_axis]
        else:  # attention written with matmul: one key/value head per query head
            key, kv_axis, kv_heads = sdpa, rank - 3, heads
        reads = [_readers(g, linears, names) for g in groups]
        if any(len(r) != 1 for r in reads):
            raise PreconditionError(f"head groups of {sdpa.format_node()} are not read by exactly one linear "
                                    f"(found {[len(r) for r in reads]}); width pruning needs an output "
                                    "projection after the attention", pass_name)
        reader = reads[0][0][0]
        family = UnitFamily("heads", block.path, heads, sdpa, rank - 3, [g.slices for g in groups],
                            [(reader, [r[0][1] for r in reads])])
        group_size = heads // kv_heads
        found.append(AttentionUnits(family, key, kv_axis, kv_heads, [h // group_size for h in range(heads)]))
    return found


def mlp_units(graph: Graph, block: Block, exclude: set[str], pass_name: str | None = None,
              escaped: set[str] | None = None) -> list[UnitFamily]:
    """The MLP neuron families of one block (producers' rows + reader's columns), by the dimension flow.

    `escaped` collects the weights whose output channels couple beyond their block (o_proj, down_proj:
    the residual stream); they are skipped in later blocks instead of being followed again."""
    escaped = set() if escaped is None else escaped
    names = set(block.nodes)
    params = set(block.params)
    linears = _linear_weights(graph)
    families: dict[str, UnitFamily] = {}
    for path, linear in ((p, n) for p, nodes in linears.items() for n in nodes):
        if linear.name not in names or path in exclude or path in escaped or \
                any(path in f.params() for f in families.values()):
            continue
        size = shape_of(linear.args[1])[0]
        first = channel_group(graph, linear, 0, pass_name=pass_name)
        if not set(first.params()) <= params:
            escaped.update(s.path for s in first.slices if s.dim == 0)
            continue
        reads = _readers(first, linears, names)
        touches_attention = bool(attention_cores(graph, {n.name for n, _ in first.masks}))
        if touches_attention or first.inputs or first.outputs or len(reads) != 1 or \
                not set(first.params()) <= params or reads[0][1] != [0]:
            continue
        last = channel_group(graph, linear, size - 1, pass_name=pass_name)
        if _shifted(first.slices, size - 1) != last.slices:
            continue  # not a one-to-one channel map (the units are not neurons)
        reader = reads[0][0]
        family = UnitFamily("mlp", block.path, size, linear.args[1], 0,
                            [_shifted(first.slices, i) for i in range(size)],
                            [(reader, [[i] for i in range(size)])])
        families[reader.name] = family
    return list(families.values())


def hidden_units(graph: Graph, pass_name: str | None = None) -> UnitFamily:
    """The hidden (residual stream) channels, seeded at the token embedding's output channels."""
    embeddings = [n for n in graph.fx.nodes if n.op == "call_function" and n.target == aten.embedding.default
                  and isinstance(n.args[0], Node) and n.args[0].op == "get_attr"]
    if not embeddings:
        raise PreconditionError(f"{graph.name} has no embedding layer to seed the hidden channels at; "
                                "embed= prunes the residual stream of token models", pass_name)
    embedding = embeddings[0]
    weight = embedding.args[0]
    size = shape_of(weight)[1]
    first = channel_group(graph, embedding, 0, pass_name=pass_name)
    if first.outputs:
        raise PreconditionError(f"the hidden channels of {graph.name} reach the graph output "
                                f"({first.outputs[0].path}): pruning them would change the output's width; "
                                "embed= needs a model whose head reads the hidden state (a causal LM)", pass_name)
    linears = _linear_weights(graph)
    readers = _readers(first, linears)
    return UnitFamily("hidden", "model", size, weight, 1, [_shifted(first.slices, c) for c in range(size)],
                      [(linear, [[c] for c in range(size)]) for linear, _ in readers])


def block_units(graph: Graph, stack: BlockStack, pass_name: str | None = None
                ) -> list[tuple[Block, list[AttentionUnits], list[UnitFamily]]]:
    """Per block: its attentions and MLP families."""
    found = []
    escaped: set[str] = set()
    for block in stack.blocks:
        attentions = attention_units(graph, block, pass_name)
        taken = {p for a in attentions for p in a.heads.params()}
        found.append((block, attentions, mlp_units(graph, block, taken, pass_name, escaped)))
    return found
