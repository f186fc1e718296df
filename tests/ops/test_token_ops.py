"""The facts of fxpress::merge_tokens: MACs by mode, checked against hand counts on a captured node."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.ir.opinfo import op_info, ops_in
from fxpress.ops.tokens import MERGE_TOKENS, TAIL_DROP

torch.set_num_threads(1)


class Merge(torch.nn.Module):
    def __init__(self, mode: str, r: int, spread: int = 3):
        super().__init__()
        self.mode, self.r, self.spread = mode, r, spread

    def forward(self, x, metric):
        return MERGE_TOKENS(x, metric, None, self.r, self.mode, True, self.spread, 0.1)[0]


def merge_macs(mode: str, r: int, metric: torch.Tensor, spread: int = 3) -> int:
    graph = fxpress.capture(Merge(mode, r, spread), (torch.randn(2, 50, 64), metric))
    (node,) = [n for n in graph.fx.nodes if n.target == MERGE_TOKENS]
    return graph.info(node).macs


KEYS = torch.randn(2, 4, 50, 16)  # (B, heads, N, d): ToMe's metric, averaged over heads by the op


@pytest.mark.parametrize("mode,r,spread,expected", [
    # B * ceil(N/2) * floor(N/2) * c similarities + B * r * C moved-token sums
    ("bipartite", 8, 3, 2 * 25 * 25 * 16 + 2 * 8 * 64),
    # bipartite's similarities + B * r * (N - r) * c removed-vs-kept + B * r * spread * C weighted sums
    ("transform", 8, 3, 2 * 25 * 25 * 16 + 2 * 8 * 42 * 16 + 2 * 8 * 3 * 64),
    ("transform", 8, 1, 2 * 25 * 25 * 16 + 2 * 8 * 42 * 16 + 2 * 8 * 1 * 64),
    # r is clamped to (N - 1) // 2 = 24 with the CLS token protected
    ("bipartite", 40, 3, 2 * 25 * 25 * 16 + 2 * 24 * 64),
    ("bipartite", 0, 3, 0),
])
def test_merge_tokens_macs_match_hand_counts(mode, r, spread, expected):
    assert merge_macs(mode, r, KEYS, spread) == expected


def test_prune_is_charged_for_no_similarity():
    """prune only selects by an importance computed (and counted) by the ATen nodes before it."""
    assert merge_macs("prune", 8, torch.randn(2, 50)) == 0


def test_token_ops_are_defined_once_with_their_facts():
    assert op_info(MERGE_TOKENS).category == op_info(TAIL_DROP).category == "tokens"
    assert {MERGE_TOKENS, TAIL_DROP} <= set(ops_in("tokens"))
    assert op_info(torch.ops.aten.linear.default).macs is not None
    assert op_info(torch.ops.aten.add.Tensor).macs is None  # elementwise: the explicit 0 default
