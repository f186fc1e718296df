"""xnor-mst: binary_conv2d(x, W) -> binary_conv2d_mst(x, pack(W), plan): channels reuse a parent's output.

MST-compression (Vo et al., ICCV 2023).  In a binary layer, output
channel j follows from channel i as

    y_j = y_i + 2 * sum_{p in D(i,j)} w_j[p] x[p],    D(i,j) = {p : w_i[p] != w_j[p]}

so computing y_j from y_i costs |D(i,j)| (the Hamming distance) bit
operations instead of K = C_in * kh * kw.  For every binary op
(`fxpress.binary_conv2d` / `binary_linear`, see `binarize`):

1. sign bits of the weight rows are packed into uint64 words and the
   Hamming distance of every pair of output channels is XOR + popcount,
   vectorized with numpy (`hamming_distances`);
2. networkx's minimum spanning tree (Kruskal) of the complete graph over
   channels is rooted at its center (a middle vertex of a longest path),
   which gives the least depth any root of that tree can give;
3. with `depth_bound=d` and a deeper tree, a bounded-depth heuristic
   builds the tree instead: Prim's algorithm grown from a root where a
   vertex may only attach to a tree vertex of depth < d (tried from the
   MST's center, the channel with the least total distance and the next
   lowest-eccentricity channels; the lightest tree wins, re-rooted at its
   center).  Such a tree weighs at least the MST's; the stats say how much;
4. the op becomes its frozen MST form: packed weight bits, the plan
   (`ReusePlan`: breadth-first order, parents, differing positions) and
   the scale and bias evaluated to buffers.  Outputs are unchanged.

Stats per layer: dense bit-ops C_out * K and MST bit-ops K + total MST
weight (per output position), their ratio, and the tree depth; totals are
per sample (times output positions).  Run `binarize` first: sign-pattern
layers in ATen form and float layers are reported, not rewritten.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx
import numpy as np
import torch

from fxpress.errors import PreconditionError
from fxpress.ir.graph import Graph
from fxpress.ir.builder import Builder, Inserter
from fxpress.ir.rewrite import add_tensor, constant_nodes, erase_dead, evaluate_constant
from fxpress.passes.binary.binarize import find_layers
from fxpress.ops.binary import MST_OPS, ReusePlan, TRAINABLE_OPS, ops, pack_bits, pack_weight
from fxpress.passes.infra.base import Pass, PassContext, PassResult
from fxpress.passes.infra.registry import register_pass

CHUNK_BYTES = 32 << 20  # working memory of one block of the distance matrix
EXTRA_ROOTS = 4  # bounded-depth heuristic: roots tried besides the center and the medoid


# -- distances and trees --------------------------------------------------------------------
def hamming_distances(negative: np.ndarray) -> np.ndarray:
    """(C, K) bool sign bits -> (C, C) int64 Hamming distances (XOR + popcount on packed words)."""
    packed = pack_bits(negative)
    count, words = packed.shape
    rows = max(1, CHUNK_BYTES // max(1, count * words * 8))
    out = np.empty((count, count), dtype=np.int64)
    for start in range(0, count, rows):
        block = packed[start:start + rows, None, :] ^ packed[None, :, :]
        out[start:start + rows] = np.bitwise_count(block).sum(axis=-1, dtype=np.int64)
    return out


def spanning_tree(distances: np.ndarray) -> nx.Graph:
    """networkx's minimum spanning tree of the complete graph weighted by `distances`."""
    count = len(distances)
    complete = nx.Graph()
    complete.add_nodes_from(range(count))
    left, right = np.triu_indices(count, 1)
    complete.add_weighted_edges_from(zip(left.tolist(), right.tolist(), distances[left, right].tolist()))
    return nx.minimum_spanning_tree(complete, algorithm="kruskal")


def _farthest(tree: nx.Graph, start: int) -> tuple[int, dict[int, int]]:
    """The vertex farthest from `start` (in edges; lowest index on ties) and the BFS parents."""
    parents, depth, order = {start: -1}, {start: 0}, deque([start])
    while order:
        node = order.popleft()
        for other in sorted(tree.neighbors(node)):
            if other not in parents:
                parents[other], depth[other] = node, depth[node] + 1
                order.append(other)
    far = min(depth, key=lambda n: (-depth[n], n))
    return far, parents


def tree_center(tree: nx.Graph) -> tuple[int, int]:
    """(center, depth): the root of least depth, the middle of a longest path (two BFS passes)."""
    first = min(tree.nodes)
    end, _ = _farthest(tree, first)
    other, parents = _farthest(tree, end)
    path = [other]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    diameter = len(path) - 1
    return path[diameter // 2], (diameter + 1) // 2


def bounded_tree(distances: np.ndarray, root: int, bound: int) -> nx.Graph:
    """Prim's tree grown from `root` where only vertices of depth < bound take children."""
    count = len(distances)
    best = distances[root].astype(np.float64)
    attach = np.full(count, root)
    depth, done = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=bool)
    done[root], best[root] = True, np.inf
    tree = nx.Graph()
    tree.add_node(root)
    for _ in range(count - 1):
        node = int(np.argmin(np.where(done, np.inf, best)))
        parent = int(attach[node])
        tree.add_edge(parent, node, weight=int(distances[parent, node]))
        done[node], depth[node] = True, depth[parent] + 1
        if depth[node] < bound:
            closer = ~done & (distances[node] < best)
            best[closer], attach[closer] = distances[node][closer], node
    return tree


def _candidate_roots(distances: np.ndarray, tree: nx.Graph, center: int) -> list[int]:
    eccentricity = nx.eccentricity(tree) if len(tree) <= 2048 else {center: 0}
    ranked = sorted(eccentricity, key=lambda n: (eccentricity[n], n))[:EXTRA_ROOTS]
    medoid = int(np.argmin(distances.sum(axis=1)))
    return list(dict.fromkeys([center, medoid, *ranked]))


def reuse_tree(distances: np.ndarray, depth_bound: int | None = None) -> tuple[nx.Graph, int, int]:
    """(tree, root, depth): the MST rooted at its center, or a bounded-depth tree if it is too deep."""
    tree = spanning_tree(distances)
    root, depth = tree_center(tree)
    if depth_bound is None or depth <= depth_bound:
        return tree, root, depth
    best = None
    for start in _candidate_roots(distances, tree, root):
        candidate = bounded_tree(distances, start, depth_bound)
        weight = candidate.size(weight="weight")
        if best is None or weight < best[0]:
            best = (weight, candidate)
    center, depth = tree_center(best[1])
    return best[1], center, depth


def reuse_plan(negative: np.ndarray, tree: nx.Graph, root: int) -> ReusePlan:
    """Breadth-first order from `root` with each channel's parent and differing positions."""
    count, k = negative.shape
    channels, parents = [root], [-1]
    for parent, child in nx.bfs_edges(tree, root, sort_neighbors=sorted):
        channels.append(child)
        parents.append(parent)
    positions = [np.arange(k, dtype=np.int64)]
    for parent, child in zip(parents[1:], channels[1:]):
        positions.append(np.flatnonzero(negative[parent] != negative[child]))
    return ReusePlan(k, np.array(channels, dtype=np.int64), np.array(parents, dtype=np.int64), positions)


# -- the pass ---------------------------------------------------------------------------------
@dataclass
class LayerReuse:
    """What xnor-mst found for one layer (bit-ops are per output position)."""

    layer: str
    c_out: int
    k: int
    positions: int  # output positions per sample
    mst_weight: int  # total weight of the tree used
    spanning_weight: int  # total weight of the unconstrained MST
    depth: int

    @property
    def dense_bitops(self) -> int:
        return self.c_out * self.k

    @property
    def mst_bitops(self) -> int:
        return self.k + self.mst_weight

    def as_dict(self) -> dict:
        return {"layer": self.layer, "c_out": self.c_out, "k": self.k, "positions": self.positions,
                "dense_bitops": self.dense_bitops, "mst_bitops": self.mst_bitops,
                "ratio": round(self.dense_bitops / self.mst_bitops, 3), "depth": self.depth,
                "mst_weight": self.mst_weight, "spanning_weight": self.spanning_weight}


def plan_layer(weight: torch.Tensor, depth_bound: int | None = None) -> tuple[ReusePlan, int, int, int]:
    """(plan, tree weight, unconstrained MST weight, depth) for a latent weight (C_out, ...)."""
    negative = ~(weight.detach().reshape(weight.shape[0], -1) >= 0).numpy()
    distances = hamming_distances(negative)
    tree, root, depth = reuse_tree(distances, depth_bound)
    spanning = tree if depth_bound is None else spanning_tree(distances)
    plan = reuse_plan(negative, tree, root)
    return plan, int(tree.size(weight="weight")), int(spanning.size(weight="weight")), depth


def summarize(layers: list[LayerReuse]) -> dict:
    """Per-layer rows and per-sample totals (bit-ops times output positions)."""
    dense = sum(layer.dense_bitops * layer.positions for layer in layers)
    mst = sum(layer.mst_bitops * layer.positions for layer in layers)
    return {"layers": [layer.as_dict() for layer in layers], "dense_bitops_per_sample": dense,
            "mst_bitops_per_sample": mst, "ratio": round(dense / mst, 3) if mst else None}


def _frozen(graph: Graph, at: Inserter, arg: object, owner: str, wanted: str) -> object:
    """A constant argument as a get_attr: kept if it already is one, else evaluated to a buffer."""
    if not isinstance(arg, torch.fx.Node) or arg.op == "get_attr":
        return arg
    value = evaluate_constant(graph, arg).detach().clone()
    return at.get_attr(add_tensor(graph, owner, wanted, value))


def _positions(shape: tuple[int, ...], kind: str) -> int:
    if kind == "conv2d":
        return int(shape[2] * shape[3])
    return int(np.prod(shape[1:-1])) if len(shape) > 2 else 1


def rewrite_op(graph: Graph, node: torch.fx.Node, path: str, depth_bound: int | None) -> LayerReuse:
    """Replace one trainable binary op with its MST form; return what was planned."""
    x, weight_arg, scale, bias = node.args[:4]
    constant = constant_nodes(graph)
    for what, arg in (("weight", weight_arg), ("scale", scale), ("bias", bias)):
        if isinstance(arg, torch.fx.Node) and arg not in constant:
            raise PreconditionError(f"the {what} of {node.format_node()} depends on the inputs; "
                                    "xnor-mst plans constant weights only", XnorMst.name)
    weight = evaluate_constant(graph, weight_arg)
    plan, weight_sum, spanning, depth = plan_layer(weight, depth_bound)
    owner = str(weight_arg.target).rpartition(".")[0] if weight_arg.op == "get_attr" else ""
    kind = "conv2d" if node.target == ops.binary_conv2d.default else "linear"
    with Builder(graph, XnorMst.name).before(node) as at:
        packed = at.get_attr(add_tensor(graph, owner, "weight_packed", pack_weight(weight)))
        plan_node = at.get_attr(add_tensor(graph, owner, "mst_plan", plan.to_tensor()))
        args = (x, packed, plan_node, _frozen(graph, at, scale, owner, "scale_frozen"),
                _frozen(graph, at, bias, owner, "bias_frozen"))
        if kind == "conv2d":
            target, args = ops.binary_conv2d_mst.default, args + (list(weight.shape[2:]), *node.args[4:7])
        else:
            target = ops.binary_linear_mst.default
        new_node = at.call(target, *args, name=target.overloadpacket.__name__)
    shape = graph.info(node).shape
    node.replace_all_uses_with(new_node)
    erase_dead(graph, [node])
    return LayerReuse(path, plan.channels.size, plan.k, _positions(shape, kind), weight_sum, spanning, depth)


@register_pass
@dataclass(frozen=True)
class XnorMst(Pass):
    """binary_conv2d(x, W) -> binary_conv2d_mst(x, pack(W), plan): y_j = y_i + 2 sum_{W_i != W_j} w_j x."""

    name: ClassVar[str] = "xnor-mst"
    creates: ClassVar[tuple] = MST_OPS
    preserves_semantics: ClassVar[bool] = True

    depth_bound: int | None = None  # max tree depth (>= 1); none: the MST rooted at its center
    layers: tuple[str, ...] = ()  # module paths of binary layers; default: every binary op

    def __post_init__(self) -> None:
        if self.depth_bound is not None and self.depth_bound < 1:
            raise self.bad_option(f"depth_bound must be at least 1 (1 = every channel from the root), "
                             f"got {self.depth_bound}")

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        targets = self._targets(graph)
        if not targets:
            return PassResult(graph, modified=False, stats={
                **summarize([]), "reason": "no binary_linear/binary_conv2d op to plan; run binarize first"})
        new = graph.copy()
        nodes = {node.name: node for node in new.fx.nodes}
        planned = [rewrite_op(new, nodes[name], path, self.depth_bound) for name, path in targets]
        new.remove_unused_attributes()
        new.recompile()
        return PassResult(new, modified=True, stats=summarize(planned))

    def _targets(self, graph: Graph) -> list[tuple[str, str]]:
        """(node name, module path) of the binary ops to plan; clear errors for what cannot be."""
        found = find_layers(graph)
        nodes = {node.name: node for node in graph.fx.nodes}
        ready = [(f.layer, f.path) for f in found if f.state == "op" and nodes[f.layer].target in TRAINABLE_OPS]
        for path in self.layers:
            kinds = {f.state for f in found if f.path == path}
            if "float" in kinds or "binary" in kinds:
                what = "a float" if "float" in kinds else "a sign-pattern"
                raise PreconditionError(f"layer '{path}' is not a binary op ({what} layer); "
                                        f"run 'binarize{{layers={path}}}' before 'xnor-mst'", self.name)
            if not kinds:
                raise PreconditionError(f"no binary layer at '{path}'; binary layers here: "
                                        f"{', '.join(p for _, p in ready) or 'none'}", self.name)
        if self.layers:
            return [(name, path) for name, path in ready if path in self.layers]
        pattern = [f.path for f in found if f.state == "binary"]
        if not ready and pattern:
            raise PreconditionError(f"{', '.join(pattern)} compute on signs but are ATen ops, not binary ops; "
                                    "run 'binarize' before 'xnor-mst' (e.g. --pipeline binarize,xnor-mst)", self.name)
        return ready
