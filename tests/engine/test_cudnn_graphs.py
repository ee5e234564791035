"""How a cuDNN graph's plan is chosen (engine/cudnn_graphs.py), off the GPU: a stand-in for the cuDNN frontend offers
named plans per batch size and says how fast each is, and the tests watch which plans are built and timed. cuDNN's
own graphs and timings: tests/gpu (fp8 convolutions) and run 56 in docs/benchmarks.md (names across batches)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from imagesmith.engine.cudnn_graphs import REUSE_WITHIN, CudnnGraphs
from imagesmith.engine.cudnn_plan_file import PlanChoices

# Each batch size's plans, by name, in cuDNN's order (which differs between batch sizes, as it does in run 56),
# and their times in ms. At batch 2 the fastest plan at 16 is not offered at all.
OFFERED = {
    16: {"eng2": 2.0, "eng2_k24=17": 1.0, "eng4_k24=45": 3.0},
    12: {"eng4_k24=45": 2.0, "eng2": 1.6, "eng2_k24=17": 0.9},
    8: {"eng4_k24=45": 1.5, "eng2": 1.1, "eng2_k24=17": 0.6},
    4: {"eng2": 0.4, "eng4_k24=52": 0.3, "eng2_k24=17": 0.5},
    3: {"eng2": 0.3, "eng4_k24=53": 0.25},
    2: {"eng4_k24=52": 0.1, "eng2": 0.2},
}


@dataclass
class StandInGraph:
    names: list[str]
    built: list[int] = field(default_factory=list)

    def validate(self) -> None: ...
    def build_operation_graph(self) -> None: ...
    def create_execution_plans(self, modes: list[int]) -> None: ...
    def check_support(self) -> None: ...

    def get_execution_plan_count(self) -> int:
        return len(self.names)

    def build_plan_at_index(self, index: int) -> None:
        self.built.append(index)

    def get_workspace_size_plan_at_index(self, index: int) -> int:
        return 0

    def get_plan_name_at_index(self, index: int) -> str:
        return self.names[index]


@dataclass(frozen=True)
class StandInCall:
    batch: int
    channels: int = 320

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def shape_key(self) -> tuple[object, ...]:
        return (self.batch, 64, 64, self.channels)

    @property
    def family_key(self) -> tuple[object, ...]:
        return (64, 64, self.channels)

    def new_output(self) -> torch.Tensor:
        return torch.empty(0)


class StandInGraphs(CudnnGraphs):
    """CudnnGraphs with cuDNN, the GPU's name and its timing replaced; everything it decides is its own."""

    kind = "stand-in"

    def __init__(self, choices: PlanChoices | None = None) -> None:
        super().__init__()
        if choices is not None:
            self.choices = choices
        self.graphs: dict[int, StandInGraph] = {}
        self.timed_batches: list[int] = []

    @classmethod
    def module(cls) -> Any:
        return SimpleNamespace(heur_mode=SimpleNamespace(A=0, FALLBACK=1), backend_version=lambda: 91900)

    def describe(self, cudnn: Any, handle: Any, call: Any) -> tuple[Any, dict[str, Any]]:
        graph = self.graphs[call.batch] = StandInGraph(list(OFFERED[call.batch]))
        return graph, {}

    def _device_name(self, device: torch.device) -> str:
        return "NVIDIA H200"

    def _capturing(self) -> bool:
        return False

    def _time_plans(self, handle: Any, entry: Any, plans: list[int], call: Any) -> dict[int, float]:
        self.timed_batches.append(call.batch)
        return {plan: OFFERED[call.batch][entry.graph.names[plan]] for plan in plans}

    def choose(self, batch: int, channels: int = 320) -> tuple[str, dict[str, Any]]:
        entry = self._build(None, StandInCall(batch, channels))
        return entry.graph.names[entry.plan], self.reports[-1]


def test_the_first_batch_size_times_every_plan_and_keeps_the_fastest() -> None:
    graphs = StandInGraphs()
    name, report = graphs.choose(16)
    assert name == "eng2_k24=17"
    assert graphs.timed_batches == [16] and graphs.graphs[16].built == [0, 1, 2]
    assert report["by_name_from_batch"] is None and not report["remembered"]
    assert report["plans_ms"] == {"eng2": 2.0 / 5, "eng2_k24=17": 1.0 / 5, "eng4_k24=45": 3.0 / 5}


def test_a_batch_size_within_reach_builds_the_timed_plan_by_name_and_times_nothing() -> None:
    assert REUSE_WITHIN == 2.0
    graphs = StandInGraphs()
    graphs.choose(16)
    name, report = graphs.choose(8)  # the same plan is at another index in batch 8's list
    assert name == "eng2_k24=17" and graphs.graphs[8].built == [2]
    assert graphs.timed_batches == [16]
    assert report["by_name_from_batch"] == 16 and report["plans_ms"] == {}


def test_a_batch_size_too_far_from_any_timed_one_is_timed_itself() -> None:
    graphs = StandInGraphs()
    graphs.choose(16)
    name, _ = graphs.choose(4)  # 4x away: batch 16's choice could be much slower here (run 56)
    assert name == "eng4_k24=52" and graphs.timed_batches == [16, 4]
    name, report = graphs.choose(8)  # within 2x of both: 16 and 4 are equally near, and either serves
    assert report["by_name_from_batch"] in (16, 4) and graphs.timed_batches == [16, 4]
    name, report = graphs.choose(12)  # nearer 16 (1.33x) than 4 (3x, out of reach)
    assert (name, report["by_name_from_batch"]) == ("eng2_k24=17", 16)


def test_a_plan_the_batch_size_does_not_offer_means_timing_after_all() -> None:
    graphs = StandInGraphs()
    graphs.choose(4)
    name, report = graphs.choose(2)  # batch 4's fastest (eng4_k24=52) is offered at 2: built by name
    assert (name, report["by_name_from_batch"]) == ("eng4_k24=52", 4) and graphs.timed_batches == [4]
    graphs = StandInGraphs()
    graphs.choose(3)  # its fastest, eng4_k24=53, is not among batch 2's plans
    name, report = graphs.choose(2)
    assert name == "eng4_k24=52" and report["by_name_from_batch"] is None and graphs.timed_batches == [3, 2]
    graphs = StandInGraphs()
    graphs.choose(3)
    graphs.choose(16)
    graphs.choose(4)  # nearest is 3 (1.33x), whose plan batch 4 lacks; 16 is out of reach: timed
    # Batch 3 (1.5x) is nearer, but batch 2 lacks its plan; batch 4's (2x) is offered.
    name, report = graphs.choose(2)
    assert (name, report["by_name_from_batch"]) == ("eng4_k24=52", 4) and graphs.timed_batches == [3, 16, 4]


def test_a_restart_builds_each_remembered_plan_reused_ones_included(tmp_path: Path) -> None:
    path = tmp_path / "fp8-conv-plans.json"
    first = StandInGraphs(PlanChoices(path))
    first.choose(16)
    first.choose(8)
    restarted = StandInGraphs(PlanChoices(path))
    for batch in (8, 16):
        name, report = restarted.choose(batch)
        assert name == "eng2_k24=17" and report["remembered"]
        assert restarted.graphs[batch].built == [list(OFFERED[batch]).index(name)]
    assert restarted.timed_batches == []


def test_nothing_is_reused_across_shapes() -> None:
    graphs = StandInGraphs()
    graphs.choose(16)
    graphs.choose(8, channels=640)  # another convolution, a batch within reach: timed on its own
    assert graphs.timed_batches == [16, 8]
