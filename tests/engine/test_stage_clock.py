"""engine/stage_clock.py: on CUDA a stage's end is an event, read when the pass is done, never a wait for the GPU
at the stage's end; elsewhere the host's clock, at once. The CUDA side runs for real in tests/gpu."""

from __future__ import annotations

import logging

import pytest
import torch

from imagesmith.engine import stage_clock
from imagesmith.engine.stage_clock import StageClock, stage_start
from imagesmith.schemas import StageReport


class FakeEvent:
    """What a CUDA event does, on a clock the test moves: record() stamps it, synchronize() says it was waited."""

    gpu_now_ms = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.stamp: float | None = None
        self.waited = False

    def record(self) -> None:
        self.stamp = FakeEvent.gpu_now_ms

    def synchronize(self) -> None:
        self.waited = True

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.stamp is not None and end.stamp is not None and end.waited
        return end.stamp - self.stamp


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stage_clock.torch.cuda, "Event", FakeEvent)

    def no_waiting() -> None:
        raise AssertionError("a stage's end waited for the whole GPU")

    monkeypatch.setattr(torch.cuda, "synchronize", no_waiting)
    FakeEvent.gpu_now_ms = 0.0


@pytest.mark.usefixtures("fake_cuda")
def test_cuda_stages_are_timed_by_their_events_once_the_pass_is_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = StageClock()
    base = stage_start("cuda")
    FakeEvent.gpu_now_ms = 960.0
    clock.finish("base", base, 32)
    refine = stage_start("cuda")  # in the stream after the base's steps: it fires when they are done
    FakeEvent.gpu_now_ms = 1220.0
    with caplog.at_level(logging.INFO, logger="imagesmith.engine.stage_clock"):
        clock.finish("refine", refine, 8)
        assert clock.reports == []  # nothing read (nor logged) before the pass's end
        assert "stage base" not in caplog.text
        reports = clock.settle()
    assert [(r.name, r.steps, r.seconds) for r in reports] == [("base", 32, 0.96), ("refine", 8, 0.26)]
    assert "stage base 32 steps 0.96s" in caplog.text
    assert clock.settle() == reports  # settled once; asking again changes nothing


def test_cpu_stages_are_timed_by_the_host_as_each_ends() -> None:
    clock = StageClock()
    start = stage_start("cpu")
    assert start.event is None
    clock.finish("base", start, 3)
    assert [(r.name, r.steps) for r in clock.reports] == [("base", 3)]
    assert clock.reports[0].seconds >= 0
    assert clock.settle() == clock.reports


def test_a_stage_of_one_step_says_step() -> None:
    """The pass's summary line and the CLI say each stage this way ("decode 1 steps" was a black-box finding)."""
    assert str(StageReport(name="decode", steps=1, seconds=0.04)) == "decode 1 image 0.04s"  # it has no steps
    assert str(StageReport(name="decode", steps=4, seconds=0.14)) == "decode 4 images 0.14s"
    assert str(StageReport(name="base", steps=1, seconds=0.03)) == "base 1 step 0.03s"
    assert str(StageReport(name="refine", steps=8, seconds=0.26)) == "refine 8 steps 0.26s"
    assert str(StageReport(name="base", steps=32, seconds=0.962)) == "base 32 steps 0.96s"


@pytest.mark.usefixtures("fake_cuda")
def test_a_pass_that_stops_still_logs_the_stages_it_finished(caplog: pytest.LogCaptureFixture) -> None:
    """Canceled during the refiner: the base's line was logged as it ended when each stage waited for the GPU;
    with the times read at the pass's end, the engine settles them when the pass stops instead."""
    from imagesmith.engine.pipeline import StageRun

    run = StageRun(members=[])
    began = stage_start("cuda")
    FakeEvent.gpu_now_ms = 500.0
    run.finish_stage("base", began, steps=32)
    with caplog.at_level(logging.INFO, logger="imagesmith.engine.stage_clock"):
        run.settle_stages_after_failure()
    assert "stage base 32 steps 0.50s" in caplog.text
    assert [(s.name, s.steps) for s in run.clock.reports] == [("base", 32)]


@pytest.mark.usefixtures("fake_cuda")
def test_a_gpu_that_failed_costs_the_stage_times_not_the_passs_own_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from imagesmith.engine.pipeline import StageRun

    def broken(self: FakeEvent) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    run = StageRun(members=[])
    run.finish_stage("base", stage_start("cuda"), steps=3)
    monkeypatch.setattr(FakeEvent, "synchronize", broken)
    with caplog.at_level(logging.WARNING, logger="imagesmith.engine.pipeline"):
        run.settle_stages_after_failure()  # does not raise: the pass's own error goes on
    assert "the finished stages' times could not be read: CUDA error" in caplog.text
