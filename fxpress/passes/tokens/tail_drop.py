"""tail-drop: tokens -> tail_drop(tokens, keep): keep the head of a learned 1D token sequence.

For models that compress their input into an ordered 1D token sequence
(One-D-Piece, TiTok-style tokenizers) and decode from it.  The sequence is
the output of the module named by `at` (default `encoder`): the last node
owned by that module (or its submodules) that another module reads, shaped
(batch, tokens, dim).  After the pass the decoder sees only the first
`keep` tokens; sizes downstream are made generic (token_axes.py), and
per-position parameters read with the tokens (a decoder's latent position
embedding) are sliced to the kept prefix (token_resize.py), which is exact.

Models trained with the random tail-drop regularizer
(`fxpress.training.tokens.random_tail_drop`) put the information in
the head of the sequence, so their error falls as `keep` grows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import Node

from fxpress.errors import PreconditionError
from fxpress.ir.builder import Builder
from fxpress.ir.graph import Graph
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass
from fxpress.analysis.token_flow import shape_of, trace_token_axes
from fxpress.ops.tokens import TAIL_DROP
from fxpress.passes.tokens.resize import apply_size_patches, foreign_values, resolve_foreign_inputs

aten = torch.ops.aten


def _owned(graph: Graph, node: Node, path: str) -> bool:
    module_path = graph.info(node).module_path
    return module_path == path or module_path.startswith(path + ".")


def find_token_sequence(graph: Graph, path: str, pass_name: str = "tail-drop") -> Node:
    """The (batch, tokens, dim) output of module `path`: its last node read from outside it."""
    owned = [n for n in graph.fx.nodes if n.op == "call_function" and _owned(graph, n, path)]
    if not owned:
        paths = sorted({graph.info(n).module_path.split(".")[0] for n in graph.fx.nodes} - {""})
        raise PreconditionError(f"no node belongs to module '{path}'; set at= to the module that outputs "
                                f"the token sequence (top-level modules: {', '.join(paths) or 'none'})", pass_name)
    outputs = [n for n in owned if any(not _owned(graph, user, path) for user in n.users)]
    sequences = [n for n in outputs if len(shape_of(n)) == 3]
    if not sequences:
        shapes = ", ".join(f"{n.name}{list(shape_of(n))}" for n in outputs) or "none"
        raise PreconditionError(f"module '{path}' outputs no (batch, tokens, dim) sequence (its outputs: "
                                f"{shapes})", pass_name)
    return sequences[-1]


def keep_head(graph: Graph, sequence: Node, keep: int, pass_name: str = "tail-drop") -> dict:
    """Rewrite `graph` in place: users of `sequence` read only its first `keep` tokens."""
    flow = trace_token_axes(graph, {sequence: 0}, pass_name=pass_name,
                            select_ok=lambda index: 0 <= index < keep)
    values = foreign_values(graph, flow)
    build = Builder(graph, pass_name)
    with build.before(sequence.next, like=sequence) as at:
        head = at.call(TAIL_DROP, sequence, keep)
        count = at.call(aten.sym_size.int, head, 1)
    sequence.replace_all_uses_with(head, delete_user_cb=lambda user: user is not head)
    patched = apply_size_patches(build, flow)
    resolved = resolve_foreign_inputs(graph, build, flow, {0: count}, values, prefix_slice=True)
    return {"size_patches": patched, "foreign_inputs": resolved}


@register_pass
@dataclass(frozen=True)
class TailDrop(Pass):
    """tokens -> tokens[:, :keep]: the decoder reads the first `keep` tokens of a 1D token sequence."""

    name: ClassVar[str] = "tail-drop"
    creates: ClassVar[tuple] = (TAIL_DROP,)
    preserves_semantics: ClassVar[bool] = False
    keep: int = 8
    at: str = "encoder"  # module whose output is the 1D token sequence

    def __post_init__(self):
        if self.keep < 1:
            raise self.bad_option(f"keep must be >= 1, got {self.keep}")

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        sequence = find_token_sequence(graph, self.at, self.name)
        tokens = shape_of(sequence)[1]
        stats = {"sequence": sequence.name, "tokens_in": tokens, "tokens_kept": min(self.keep, tokens)}
        if self.keep >= tokens:
            return PassResult(graph, modified=False,
                              stats={**stats, "reason": f"keep={self.keep} >= {tokens} tokens: nothing to drop"})
        new = graph.copy()
        stats.update(keep_head(new, next(n for n in new.fx.nodes if n.name == sequence.name), self.keep, self.name))
        new.recompile()
        stats.update(macs_before=graph.macs, macs_after=new.macs, macs_ratio=new.macs / max(graph.macs, 1))
        return PassResult(new, modified=True, stats=stats)


__all__ = ["TailDrop", "find_token_sequence", "keep_head"]
