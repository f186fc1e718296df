"""The semantic diff of two graphs: nodes added, removed and rewired, by block, with MAC/param deltas."""
from __future__ import annotations

import torch

import fxpress
from fxpress.passes import PassContext, PassManager
from fxpress.report import graph_diff
from fxpress.report.diff import block_path, macs_by_block, params_by_block


def test_block_path_cuts_after_the_first_index():
    assert block_path("model.layers.3.mlp.up_proj") == "model.layers.3"
    assert block_path("blocks.0") == "blocks.0"
    assert block_path("patch_embed.proj") == "patch_embed.proj"
    assert block_path("head") == "head"
    assert block_path("") == ""


def test_a_graph_against_itself_has_no_diff(zoo_model):
    model = zoo_model("vit-mnist")
    graph = fxpress.capture(model.module, model.example_inputs)
    diff = graph_diff(graph, graph.copy())
    assert not diff.changed
    assert diff.modules == [] and diff.counts == {"added": 0, "removed": 0, "rewired": 0}


def test_remove_layers_diff_names_the_removed_block(zoo_model):
    model = zoo_model("vit-mnist")
    graph = fxpress.capture(model.module, model.example_inputs)
    result = PassManager("remove-layers{count=1,metric=last},dce").run(graph, PassContext())
    removed = result.reports[0].stats["removed"]
    assert len(removed) == 1
    diff = graph_diff(graph, result.graph)
    rows = {m.module: m for m in diff.modules}
    gone = rows[removed[0]]
    assert gone.macs_after == 0 and gone.params_after == 0
    assert gone.macs_before == macs_by_block(graph)[removed[0]] > 0
    assert gone.params_before == params_by_block(graph)[removed[0]] > 0
    assert gone.removed > 0 and gone.added == 0
    assert diff.counts["removed"] >= gone.removed and diff.counts["added"] == 0
    # the kept blocks did not change; none of them is a row
    assert all(m.module == removed[0] or m.module not in ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
               for m in diff.modules if m.module != removed[0])
    assert sum(m.macs_before - m.macs_after for m in diff.modules) == graph.macs - result.graph.macs


def test_merge_tokens_diff_adds_nodes_in_every_block_it_merges(zoo_model):
    model = zoo_model("vit-mnist")
    graph = fxpress.capture(model.module, model.example_inputs)
    result = PassManager("merge-tokens{r=8}").run(graph, PassContext())
    diff = graph_diff(graph, result.graph)
    rows = {m.module: m for m in diff.modules}
    merged = [f"blocks.{i}" for i, r in enumerate(result.reports[0].stats["r_per_block"]) if r]
    assert merged and all(rows[b].added > 0 and rows[b].macs_after < rows[b].macs_before for b in merged)
    assert diff.counts["added"] == len(diff.added) == result.graph.num_nodes - graph.num_nodes + diff.counts["removed"]
    assert all(line.startswith("%") for line in diff.added)
    assert "nodes" in diff.summary()


def test_rewired_is_a_node_reading_other_inputs():
    class Two(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    graph = fxpress.capture(Two(), (torch.randn(2, 3),))
    edited = graph.copy()
    add = next(n for n in edited.fx.nodes if n.op == "call_function" and "add" in str(n.target))
    relu = add.args[0]
    add.replace_input_with(relu, relu.args[0])  # add now reads x, relu is dead but kept
    edited.recompile()
    diff = graph_diff(graph, edited)
    assert diff.counts == {"added": 0, "removed": 0, "rewired": 1}
    assert diff.rewired[0].startswith(f"%{add.name}")


def test_trained_weights_are_counted_per_block_and_nothing_else_changes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    graph = fxpress.capture(model, (torch.randn(3, 4),))
    edited = graph.copy()
    name, tensor = next((n, t) for n, t in edited.referenced_tensors().items() if n.endswith("weight"))
    path, _, attr = name.rpartition(".")
    owner = edited.module.get_submodule(path) if path else edited.module
    setattr(owner, attr, torch.nn.Parameter(tensor.detach() + 1))
    diff = graph_diff(graph, edited)
    assert [(m.module, m.weights_changed, m.added, m.removed, m.rewired) for m in diff.modules] == \
        [(path.split(".")[0] if path else "<top>", tensor.numel(), 0, 0, 0)]
    assert diff.summary() == "no node changed"


def test_a_tied_weight_counts_once_under_its_smallest_name():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    graph = fxpress.capture(Tied(), (torch.tensor([[1, 2, 3]]),))
    assert params_by_block(graph) == {"embed": 40}
