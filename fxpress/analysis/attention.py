"""Find the repeated transformer blocks of a captured graph by pattern.

The pattern, on torch.export (ATen) graphs, independent of module names:

1. Attention core: either an explicit ``softmax`` whose input comes from a
   ``matmul``/``bmm`` of queries and transposed keys through at most a few
   scale/mask ops (``mul``, ``div``, ``add``, ``sub``, ``to``) and whose output
   feeds ``matmul(probabilities, values)``; or a fused
   ``aten.scaled_dot_product_attention``.
2. Attention residual: the first ``add`` after the core whose one input
   descends from the core (the attention branch, through its projection,
   dropout, ...) and whose other input is an ancestor of the core (the
   residual stream the attention read).  Pre-norm (``x + attn(norm1(x))``)
   and post-norm (``norm(x + attn(x))``) blocks both match.
3. MLP residual: the next ``add`` before the following attention core whose
   inputs both descend from the attention residual, one an ancestor of the
   other (``h + mlp(norm2(h))``), with a ``linear``/``matmul`` between them.
4. Block output: the MLP residual, followed forward through single-user
   per-token ops of the same block (the final ``layer_norm`` of post-norm).

``find_transformer_blocks(graph)`` returns the blocks in order; each knows its
module path (``blocks.2``, ``vit.layers.2``), its attention core (queries,
keys, values, softmax input) and the residual stream entering and leaving it,
so passes can merge tokens between attention and MLP or drop whole blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch.fx import Node

from fxpress.ir.graph import META_KEY, Graph
from fxpress.ir.opinfo import op_info
from fxpress.ir.rewrite import ancestors

aten = torch.ops.aten

SOFTMAX_OPS = (aten.softmax.int, aten._softmax.default, aten.special_softmax.default)
MATMUL_OPS = (aten.matmul.default, aten.bmm.default)
SCORE_OPS = (aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.to.dtype,
             aten._to_copy.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor)
PASS_THROUGH_OPS = (aten.dropout.default, aten.to.dtype, aten._to_copy.default, aten.clone.default,
                    aten.contiguous.default, aten.alias.default)
PER_TOKEN_OPS = (aten.layer_norm.default, aten.dropout.default, aten.contiguous.default, aten.clone.default)
ADD_OPS = (aten.add.Tensor,)
_SCORE_DEPTH = 4
CHANNEL_MIXING = ("matmul", "binary")  # OpInfo categories of an MLP's layers (binarized ones too)


def _category(node: Node) -> str | None:
    info = op_info(node.target) if node.op == "call_function" else None
    return info.category if info is not None else None


@dataclass(frozen=True)
class AttentionCore:
    """One attention computation: its core node and the tensors around it."""

    kind: str  # "softmax" (explicit q @ k^T, softmax, @ v) or "sdpa"
    node: Node  # the softmax or scaled_dot_product_attention node
    query: Node  # (B, H, N, d) queries
    key: Node  # keys; (B, H, N, d) unless key_transposed
    key_transposed: bool  # True when `key` is the (B, H, d, N) operand of the scores matmul
    value: Node
    scores: Node | None  # softmax input (explicit attention only)
    module_path: str


@dataclass(frozen=True)
class TransformerBlock:
    """A residual attention(+MLP) block located by `find_transformer_blocks`."""

    index: int
    path: str  # common module path of the attention and its residual add, e.g. "blocks.2"
    attention: AttentionCore
    stream_in: Node  # residual stream entering the attention residual add
    attn_residual: Node  # add(stream_in, attention branch)
    mlp_residual: Node | None  # add(h, mlp(h)); None for attention-only blocks
    output: Node  # residual stream leaving the block

    def describe(self) -> str:
        mlp = self.mlp_residual.name if self.mlp_residual is not None else "-"
        return (f"block {self.index} ({self.path or '<top>'}): {self.attention.kind} attention "
                f"{self.attention.node.name}, residual {self.attn_residual.name}, mlp residual {mlp}, "
                f"output {self.output.name}")


def _shape(node: object) -> tuple[int, ...] | None:
    record = node.meta.get(META_KEY) if isinstance(node, Node) else None
    return record.shape if record is not None else None


def _path(node: Node) -> str:
    record = node.meta.get(META_KEY)
    return record.module_path if record is not None else ""


def _scores_matmul(softmax: Node) -> Node | None:
    """The q @ k^T matmul a softmax reads, through at most a few scale/mask ops."""
    current = softmax.args[0]
    for _ in range(_SCORE_DEPTH):
        if not isinstance(current, Node) or current.op != "call_function":
            return None
        if current.target in MATMUL_OPS:
            return current
        if current.target not in SCORE_OPS:
            return None
        current = next((a for a in current.args if isinstance(a, Node) and (_shape(a) or ()) == _shape(current)),
                       current.args[0])
    return None


def _values_matmul(softmax: Node) -> Node | None:
    """The probabilities @ v matmul a softmax feeds, through pass-through ops."""
    frontier = [softmax]
    for _ in range(_SCORE_DEPTH):
        nxt = []
        for node in frontier:
            for user in node.users:
                if user.target in MATMUL_OPS and user.args[0] is node:
                    return user
                if user.target in PASS_THROUGH_OPS:
                    nxt.append(user)
        frontier = nxt
    return None


def _untransposed_key(key_t: Node) -> tuple[Node, bool]:
    """(k, False) when the scores operand is transpose(k, -2, -1); else (k^T, True)."""
    rank = len(_shape(key_t) or ())
    if key_t.target == aten.transpose.int:
        dims = {d % rank for d in key_t.args[1:3]}
        if dims == {rank - 2, rank - 1}:
            return key_t.args[0], False
    if key_t.target == aten.permute.default:
        order = [d % rank for d in key_t.args[1]]
        if order == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return key_t.args[0], False
    return key_t, True


def find_attention_cores(graph: Graph) -> list[AttentionCore]:
    """Explicit (softmax between two matmuls) and fused (SDPA) attention, in graph order."""
    cores = []
    for node in graph.fx.nodes:
        if node.op != "call_function":
            continue
        if _category(node) == "attention":
            query, key, value = node.args[:3]
            cores.append(AttentionCore("sdpa", node, query, key, False, value, None, _path(node)))
        elif node.target in SOFTMAX_OPS:
            scores, values = _scores_matmul(node), _values_matmul(node)
            if scores is None or values is None:
                continue
            key, transposed = _untransposed_key(scores.args[1])
            cores.append(AttentionCore("softmax", node, scores.args[0], key, transposed, values.args[1],
                                       node.args[0], _path(node)))
    return cores


def _same_shape_add(node: Node) -> bool:
    if node.op != "call_function" or node.target not in ADD_OPS or len(node.args) < 2:
        return False
    left, right = node.args[:2]
    return isinstance(left, Node) and isinstance(right, Node) and _shape(left) == _shape(right) == _shape(node)


def _forward(start: Node, stop: Node | None) -> Iterable[tuple[Node, set[Node]]]:
    """Nodes after `start` (up to `stop`) with the growing set of start's descendants."""
    reached = {start}
    node = start.next
    while node.op != "root" and node is not stop:
        if any(a in reached for a in node.all_input_nodes):
            reached.add(node)
        yield node, reached
        node = node.next


def _attention_residual(core: AttentionCore, stop: Node | None) -> tuple[Node, Node] | None:
    upstream = ancestors(core.node)
    for node, reached in _forward(core.node, stop):
        if not _same_shape_add(node):
            continue
        left, right = node.args[:2]
        if left in reached and right in upstream:
            return node, right
        if right in reached and left in upstream:
            return node, left
    return None


def _mlp_residual(attn_residual: Node, stop: Node | None) -> Node | None:
    for node, reached in _forward(attn_residual, stop):
        if not _same_shape_add(node):
            continue
        left, right = node.args[:2]
        if left not in reached or right not in reached:
            continue
        for stream, branch in ((left, right), (right, left)):
            between = ancestors(branch) - ancestors(stream) - {stream}
            if stream in ancestors(branch) and any(_category(n) in CHANNEL_MIXING for n in between | {branch}):
                return node
    return None


def _block_output(node: Node, path: str) -> Node:
    while len(node.users) == 1:
        (user,) = node.users
        if user.target not in PER_TOKEN_OPS or not _path(user).startswith(path) or user.args[0] is not node:
            break
        node = user
    return node


def _common_path(first: str, second: str) -> str:
    common = []
    for a, b in zip(first.split("."), second.split(".")):
        if a != b:
            break
        common.append(a)
    return ".".join(common)


def find_transformer_blocks(graph: Graph) -> list[TransformerBlock]:
    """Residual attention blocks in graph order (see the module doc for the pattern)."""
    cores = find_attention_cores(graph)
    blocks: list[TransformerBlock] = []
    for position, core in enumerate(cores):
        stop = cores[position + 1].node if position + 1 < len(cores) else None
        found = _attention_residual(core, stop)
        if found is None:
            continue
        residual, stream_in = found
        mlp = _mlp_residual(residual, stop)
        path = _common_path(core.module_path, _path(mlp if mlp is not None else residual))
        output = _block_output(mlp if mlp is not None else residual, path)
        blocks.append(TransformerBlock(len(blocks), path, core, stream_in, residual, mlp, output))
    return blocks


def token_count(block: TransformerBlock) -> int:
    """Tokens in the residual stream at the block's attention residual (example inputs)."""
    shape = _shape(block.attn_residual)
    return int(shape[-2]) if shape and len(shape) >= 2 else 0


__all__ = ["AttentionCore", "TransformerBlock", "ancestors", "find_attention_cores", "find_transformer_blocks",
           "token_count"]
