"""The MST reuse plan: distances, tree, center, depth bound, and exact replay."""
from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpress.errors import PipelineError
from fxpress.passes import parse_pipeline
from fxpress.ops.binary import ReusePlan, binary_sign, pack_weight
from fxpress.passes.binary.xnor_mst import hamming_distances, plan_layer, reuse_plan, reuse_tree, tree_center

torch.set_num_threads(1)
FAST = settings(max_examples=25, deadline=None)


def sign_rows(seed: int, channels: int, k: int, duplicates: bool) -> np.ndarray:
    """(C, K) bool sign bits (True = -1): noisy copies of prototypes, exact duplicates on request."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((max(1, channels // 3), k)) < 0.5
    rows = prototypes[rng.integers(len(prototypes), size=channels)] ^ (rng.random((channels, k)) < 0.2)
    if duplicates and channels > 1:
        rows[-1] = rows[0]
    return rows


def independent_mst_weight(negative: np.ndarray) -> float:
    """MST weight from +-1 inner products and networkx's Prim, sharing no code with the pass."""
    signs = 1.0 - 2.0 * negative.astype(np.float64)
    distances = (negative.shape[1] - signs @ signs.T) / 2
    graph = nx.Graph()
    graph.add_nodes_from(range(len(signs)))
    graph.add_weighted_edges_from((i, j, distances[i, j]) for i in range(len(signs)) for j in range(i + 1, len(signs)))
    return nx.minimum_spanning_tree(graph, algorithm="prim").size(weight="weight")


def replay(plan: ReusePlan, negative: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The issue's recurrence in plain integers: y_j = y_i + 2 sum_{p in D} w_j[p] x[p]."""
    w = 1 - 2 * negative.astype(np.int64)
    y = np.zeros((len(x), len(w)), dtype=np.int64)
    for channel, parent, where in zip(plan.channels, plan.parents, plan.positions):
        if parent < 0:
            y[:, channel] = x[:, where] @ w[channel, where]
        else:
            y[:, channel] = y[:, parent] + 2 * (x[:, where] @ w[channel, where])
    return y


cases = st.fixed_dictionaries({"channels": st.integers(1, 40), "k": st.integers(1, 300), "seed": st.integers(0, 2**31),
                               "duplicates": st.booleans()})


@FAST
@given(case=cases)
def test_hamming_distances_match_inner_products(case):
    negative = sign_rows(case["seed"], case["channels"], case["k"], case["duplicates"])
    signs = 1 - 2 * negative.astype(np.int64)
    assert np.array_equal(hamming_distances(negative), (case["k"] - signs @ signs.T) // 2)


@FAST
@given(case=cases)
def test_tree_is_a_minimum_spanning_tree_rooted_at_minimal_depth(case):
    negative = sign_rows(case["seed"], case["channels"], case["k"], case["duplicates"])
    tree, root, depth = reuse_tree(hamming_distances(negative))
    assert tree.number_of_nodes() == case["channels"] and nx.is_tree(tree)
    assert tree.size(weight="weight") == independent_mst_weight(negative)
    eccentricity = nx.eccentricity(tree)
    assert depth == eccentricity[root] == min(eccentricity.values())


@FAST
@given(case=cases, bound=st.sampled_from([None, 1, 2, 3]), rows=st.integers(1, 5))
def test_every_channel_is_reached_from_the_root_and_the_plan_replays_exactly(case, bound, rows):
    negative = sign_rows(case["seed"], case["channels"], case["k"], case["duplicates"])
    tree, root, depth = reuse_tree(hamming_distances(negative), bound)
    plan = reuse_plan(negative, tree, root)
    assert sorted(plan.channels.tolist()) == list(range(case["channels"]))  # each channel once
    seen = set()
    for channel, parent in zip(plan.channels.tolist(), plan.parents.tolist()):
        assert parent in seen or (parent == -1 and channel == root)  # the parent came first
        seen.add(channel)
    assert plan.depths.max() == depth and (bound is None or depth <= bound)
    assert plan.bitops == case["k"] + tree.size(weight="weight")
    x = 1 - 2 * (np.random.default_rng(case["seed"]).random((rows, case["k"])) < 0.5).astype(np.int64)
    assert np.array_equal(replay(plan, negative, x), x @ (1 - 2 * negative.astype(np.int64)).T)
    assert ReusePlan.from_tensor(plan.to_tensor()).positions[-1].tolist() == plan.positions[-1].tolist()


@FAST
@given(case=cases, bound=st.integers(1, 4))
def test_depth_bound_gives_a_tree_within_the_bound_no_lighter_than_the_mst(case, bound):
    negative = sign_rows(case["seed"], case["channels"], case["k"], case["duplicates"])
    distances = hamming_distances(negative)
    tree, root, depth = reuse_tree(distances, bound)
    assert nx.is_tree(tree) and tree.number_of_nodes() == case["channels"] and depth <= bound
    assert tree.size(weight="weight") >= reuse_tree(distances)[0].size(weight="weight")
    if bound == 1:  # a star: every channel from the root
        assert all(tree.has_edge(root, other) for other in tree if other != root)


def test_tree_center_of_a_path_is_its_middle():
    path = nx.path_graph(7)
    assert tree_center(path) == (3, 3)
    assert tree_center(nx.path_graph(6))[1] == 3
    assert tree_center(nx.empty_graph(1)) == (0, 0)


def test_reference_op_replays_the_plan_like_the_dense_op():
    weight = torch.randn(9, 4, 3, 2)
    plan, _, _, _ = plan_layer(weight)
    x = torch.randn(3, 4, 6, 5)
    dense = torch.ops.fxpress.binary_conv2d(x, weight, None, None, [1, 2], [1, 0], [1, 1])
    mst = torch.ops.fxpress.binary_conv2d_mst(x, pack_weight(weight), plan.to_tensor(), None, None, [3, 2],
                                              [1, 2], [1, 0], [1, 1])
    assert torch.equal(dense, mst)
    linear = torch.randn(7, 33)
    plan, _, _, _ = plan_layer(linear, depth_bound=2)
    x = torch.randn(2, 5, 33)
    expected = binary_sign(x) @ binary_sign(linear).T
    assert torch.equal(torch.ops.fxpress.binary_linear_mst(x, pack_weight(linear), plan.to_tensor(), None, None),
                       expected)


@pytest.mark.parametrize("text", ["xnor-mst{depth_bound=0}", "xnor-mst{depth_bound=-3}", "xnor-mst{depth_bound=two}"])
def test_bad_depth_bound_fails_when_the_pipeline_is_parsed(text):
    with pytest.raises(PipelineError, match="depth_bound"):
        parse_pipeline(text)


def test_depth_bound_round_trips_through_pipeline_text():
    passes = parse_pipeline("xnor-mst{depth_bound=3}")
    assert str(passes[0]) == "xnor-mst{depth_bound=3,layers=}"
    assert parse_pipeline(str(passes[0]))[0] == passes[0]
    assert parse_pipeline("xnor-mst")[0].depth_bound is None
