"""A pass's stages timed on the GPU's own clock, so the host never waits for the GPU at a stage's end.

Why: each stage used to end with `torch.cuda.synchronize()` so that its time included its GPU work. The host
then set up the next stage (the refiner's timesteps, the decoder's first compiled call: dynamo's guards, the
inductor wrapper's launches) while the GPU, with nothing queued, waited: ~13 ms an ensemble image on an H200 was
idle at the stage boundaries (run 103 in docs/benchmarks.md). Without the wait the host queues the next stage
while the GPU still runs the last one's steps; diffusers' own waits (a pageable copy of the refiner's timesteps
to the GPU) still stop it where they are, but the decoder's first call and the host work before those waits
overlap the GPU's work.

How: a CUDA event is recorded where a stage begins and another where it ends, on the stream the pass runs on.
The start event fires when the GPU reaches it: at once for the first stage (the GPU is idle when a pass begins),
and for a later stage when the stage before it has finished on the GPU. So the stages' times still add up to the
pass, each from the end of the one before to its own end on the GPU, as the synchronised times did. The times are
read once the pass's pixels have reached the host (which waits for everything anyway), and logged then.
Elsewhere (the CPU, Apple's GPU) the host's own clock times each stage when it returns, as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from imagesmith.schemas import StageReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageStart:
    """Where a stage began: the host's clock, and on CUDA an event in the pass's stream."""

    host: float
    event: Any = None  # torch.cuda.Event, recorded; None: timed by the host


def stage_start(device: torch.device | str) -> StageStart:
    """Mark a stage's beginning. `device`: where the stage computes."""
    event = None
    if torch.device(device).type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
    return StageStart(time.perf_counter(), event)


@dataclass
class _Pending:
    name: str
    steps: int
    start: Any
    end: Any


@dataclass
class StageClock:
    """The stages of one pass in order: timed by the host as each ends, or by the GPU once the pass is done."""

    reports: list[StageReport] = field(default_factory=list)
    _pending: list[_Pending] = field(default_factory=list)

    def finish(self, name: str, start: StageStart, steps: int) -> None:
        """The stage has been queued (on CUDA) or has run (elsewhere)."""
        if start.event is None:
            self._report(name, steps, time.perf_counter() - start.host)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append(_Pending(name, steps, start.event, end))

    def settle(self) -> list[StageReport]:
        """Every stage's report, waiting for the GPU where a stage's end has not come yet (after a pass's pixels
        reached the host, it has)."""
        for pending in self._pending:
            pending.end.synchronize()
            self._report(pending.name, pending.steps, pending.start.elapsed_time(pending.end) / 1000)
        self._pending.clear()
        return self.reports

    def _report(self, name: str, steps: int, seconds: float) -> None:
        report = StageReport(name=name, steps=steps, seconds=seconds)
        self.reports.append(report)
        # "stage base 32 steps 0.96s": each stage as the pass's summary line says it.
        log.info("stage %s", report)
