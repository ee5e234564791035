"""benchmarks/weight_only_nodes.py: finds the graph nodes that depend on a model's weights alone (per-call work
that could be done once), and finds none but the timestep frequency table in the engine's UNet setup."""

import importlib
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks folder is not a package
    return importlib.import_module("weight_only_nodes")


class _TransposedEachCall(torch.nn.Module):
    def __init__(self, copy_weight: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3))
        self.copy_weight = copy_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t().contiguous() * 2 if self.copy_weight else self.weight.t()
        return x @ weight


def test_work_on_the_weights_alone_is_found_and_work_on_the_input_is_not(module: ModuleType) -> None:
    x = torch.randn(2, 3)
    copying = module.weight_only_nodes(torch.export.export(_TransposedEachCall(True), (x,)))
    plain = module.weight_only_nodes(torch.export.export(_TransposedEachCall(False), (x,)))
    assert sum(copying.values()) >= 3  # the transpose, its copy and the scaling
    assert any("mul" in op for op in copying)
    assert plain == {"aten.t.default": 1}  # a view: free, but still the weights' alone


def test_the_engines_unet_setup_leaves_only_the_timestep_frequency_table(module: ModuleType) -> None:
    found = module.weight_only_nodes(module.export_unet("base", "smoke"))
    assert "aten.arange.start" in found and "aten.exp.default" in found
    assert set(found) <= {
        "aten.arange.start",
        "aten.mul.Tensor",
        "aten.div.Tensor",
        "aten.exp.default",
        "aten.unsqueeze.default",
    }
