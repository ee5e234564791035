"""A running job's progress as its clients see it: steps over every stage, an ETA, occasional previews.

The engine reports each stage's steps on their own (base 1..32, then refine 1..8); clients want one count over
the job (1..40) and an estimate of what is left. The worker keeps each running job's LiveProgress for
GET /v1/jobs/ID and A1111's /progress, and publishes it as a "progress" event for the job's stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from imagesmith.config import Settings
from imagesmith.engine.progress import DECODE_STAGE, ProgressEvent
from imagesmith.jobs.events import EventHub
from imagesmith.jobs.store import JobRecord
from imagesmith.preview import PreviewCopy
from imagesmith.sources.base import ImageRequest

log = logging.getLogger(__name__)


class TrackingWorker(Protocol):
    """What a tracker needs of the worker (jobs/worker.py): the job's planned steps, where live progress is
    kept, the settings for previews, and the event hub."""

    live: dict[str, LiveProgress]
    settings: Settings
    hub: EventHub

    def planned_steps(self, request: ImageRequest) -> dict[str, int]: ...


@dataclass
class LiveProgress:
    """One running job's progress: the stage and its step, the count over the whole job, and the ETA."""

    stage: str
    step: int
    total: int
    overall_step: int
    overall_total: int
    elapsed_s: float
    eta_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @property
    def fraction(self) -> float:
        """Share of the job's steps done, 0..1, rounded as both APIs show it."""
        return round(self.overall_step / self.overall_total, 4) if self.overall_total else 0.0

    @property
    def eta_rounded_s(self) -> float | None:
        return round(self.eta_s, 2) if self.eta_s is not None else None


class ProgressTracker:
    """Turns the engine's per-stage events into overall progress, an ETA and occasional previews."""

    def __init__(self, worker: TrackingWorker, job: JobRecord, request: ImageRequest) -> None:
        self.worker, self.job = worker, job
        self.planned = sum(worker.planned_steps(request).values())
        self.done_before = 0
        self.stage: str | None = None
        self.stage_total = 0
        self.step = 0
        self.stage_starts: dict[str, int] = {}  # stage -> steps done before it began
        self.preview: PreviewCopy | None = None  # the newest preview, until its copy to the host is done

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage == DECODE_STAGE:
            self._decoding(event)
            return
        if event.stage != self.stage or event.step < self.step:
            if event.stage in self.stage_starts:
                # The pass started again (the engine's eager retry after a compiled pass failed): count
                # from where this stage began the first time, not on top of what ran before.
                self.done_before = self.stage_starts[event.stage]
            elif self.stage is not None:
                self.done_before += self.stage_total
            self.stage_starts.setdefault(event.stage, self.done_before)
            self.stage, self.stage_total = event.stage, event.total
        self.step = event.step
        # A refiner fallback adds a "base_finish" stage the plan did not know about; grow the total.
        overall_total = max(self.planned, self.done_before + event.total)
        done = min(self.done_before + event.step, overall_total)
        eta = event.elapsed_s / done * (overall_total - done) if done else None
        self._publish(
            LiveProgress(event.stage, event.step, event.total, done, overall_total, event.elapsed_s, eta),
            event,
        )

    def _publish(self, live: LiveProgress, event: ProgressEvent) -> None:
        self.worker.live[self.job.id] = live
        data = {"job_id": self.job.id, **live.as_dict()}
        try:
            preview = self._preview(event)
        except Exception:  # a preview is a nicety; never let it fail the job
            log.debug("preview failed", exc_info=True)
            self.preview = preview = None
        if preview is not None:
            data["preview"] = preview
        self.worker.hub.publish(self.job.id, "progress", data)

    def _decoding(self, event: ProgressEvent) -> None:
        """The decode is a stage of one pass: its own count, as the engine gives it (0 of 1 when it starts, 1 of
        1 when the pixels are ready; repeating the last denoising stage's count under the name "decode" read as
        a fourth of four decode steps), every denoising step done over the job, and no ETA until the pixels are
        ready. The last step's preview, still on its way to the host at that step's event on a GPU, rides on
        these."""
        done = self.done_before + self.stage_total  # every denoising step that ran, a fallback's included
        eta = 0.0 if event.step >= event.total else None
        self._publish(
            LiveProgress(event.stage, event.step, event.total, done, done, event.elapsed_s, eta), event
        )

    def _preview(self, event: ProgressEvent) -> str | None:
        """Every preview_every steps a new preview starts on its way to the host; it rides on the first
        progress event after its copy is done (on a GPU usually a step or two later, on the CPU this one), so
        the GPU thread never waits for it (preview.PreviewCopy says why)."""
        every = self.worker.settings.preview_every
        if every and event.latents is not None and (event.step % every == 0 or event.step == event.total):
            self.preview = PreviewCopy(event.latents, 0)  # the newest wins over one still on its way
        if self.preview is None or not self.preview.ready():
            return None
        ready, self.preview = self.preview, None
        return ready.data_url(self.worker.settings.preview_max_side)
