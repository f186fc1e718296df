"""The value recorder: observers see the chosen nodes' values, equal to the eager model's."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.analysis.recorder import ValueRecorder, record_values

torch.set_num_threads(1)
aten = torch.ops.aten


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_observers_see_every_selected_value():
    model, x = MLP().eval(), torch.randn(4, 6)
    graph = fxpress.capture(model, (x,))
    seen: dict[str, torch.Tensor] = {}
    recorder = ValueRecorder(graph, select=lambda node: node.target == aten.linear.default)
    recorder.add_observer(lambda node, value: seen.setdefault(node.name, value))
    out = recorder.run_batch((x,))
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, model(x))
    first, second = (seen[n.name] for n in graph.fx.nodes if n.target == aten.linear.default)
    assert torch.allclose(first, model.fc1(x)) and torch.allclose(second, model(x))
    assert recorder.values == {}  # keep=False: nothing stored


def test_record_values_by_name_and_unknown_names():
    model, x = MLP().eval(), torch.randn(4, 6)
    graph = fxpress.capture(model, (x,))
    relu = next(n.name for n in graph.fx.nodes if n.target == aten.relu.default)
    assert torch.allclose(record_values(graph, (x,), [relu])[relu], torch.relu(model.fc1(x)))
    with pytest.raises(KeyError, match="no node named 'nope'"):
        ValueRecorder(graph, ["nope"])
