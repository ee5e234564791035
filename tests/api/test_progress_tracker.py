"""The worker's progress for one job: steps over every stage, with an ETA, also when a pass starts again.

The engine runs a pass again, eagerly, when a compiled pass fails inside torch.compile (engine.generate_batch):
its progress events then restart at the first step of the first stage.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from imagesmith.api.a1111 import sampling_counts
from imagesmith.engine.progress import ProgressEvent
from imagesmith.jobs import progress_tracker as tracker_module
from imagesmith.jobs.progress_tracker import ProgressTracker


def _tracker(
    preview_every: int = 0, published: list[dict[str, Any]] | None = None
) -> tuple[ProgressTracker, dict[str, Any]]:
    live: dict[str, Any] = {}
    sink = published if published is not None else []
    worker = SimpleNamespace(
        planned_steps=lambda request: {"base": 3, "refine": 1},
        live=live,
        settings=SimpleNamespace(preview_every=preview_every, preview_max_side=128),
        hub=SimpleNamespace(publish=lambda job_id, type_, data: sink.append(data)),
    )
    return ProgressTracker(worker, SimpleNamespace(id="job"), None), live  # type: ignore[arg-type]


def _overall(
    tracker: ProgressTracker, live: dict[str, Any], stage: str, step: int, total: int
) -> tuple[int, int]:
    tracker(ProgressEvent(stage, step, total, elapsed_s=float(step)))
    return live["job"].overall_step, live["job"].overall_total


def test_steps_add_up_across_stages() -> None:
    tracker, live = _tracker()
    seen = [_overall(tracker, live, "base", step, 3) for step in (1, 2, 3)]
    seen.append(_overall(tracker, live, "refine", 1, 1))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_a_pass_that_starts_again_counts_from_where_its_stages_began() -> None:
    tracker, live = _tracker()
    for step in (1, 2, 3):
        _overall(tracker, live, "base", step, 3)
    _overall(tracker, live, "refine", 1, 1)
    # The retry: base from its first step again, then the refiner.
    assert _overall(tracker, live, "base", 1, 3) == (1, 4)
    assert _overall(tracker, live, "base", 2, 3) == (2, 4)
    assert _overall(tracker, live, "base", 3, 3) == (3, 4)
    assert _overall(tracker, live, "refine", 1, 1) == (4, 4)


def test_a_retry_in_the_middle_of_the_first_stage_goes_back_to_its_start() -> None:
    tracker, live = _tracker()
    _overall(tracker, live, "base", 1, 3)
    _overall(tracker, live, "base", 2, 3)
    assert _overall(tracker, live, "base", 1, 3) == (1, 4)


def test_the_refiner_fallback_stage_grows_the_total() -> None:
    tracker, live = _tracker()
    for step in (1, 2, 3):
        _overall(tracker, live, "base", step, 3)
    # The refiner failed; the base finishes the schedule instead: one more stage the plan did not know.
    assert _overall(tracker, live, "base_finish", 1, 1) == (4, 4)


def test_the_decode_shows_its_own_count_and_every_step_done() -> None:
    published: list[dict[str, Any]] = []
    tracker, live = _tracker(published=published)
    for step in (1, 2, 3):
        _overall(tracker, live, "base", step, 3)
    _overall(tracker, live, "refine", 1, 1)
    tracker(ProgressEvent("decode", 0, 1, elapsed_s=4.0))
    started = live["job"]
    # The decode's own count (as the library's callback gets it), not the refine stage's "1 of 1" again under
    # the name decode; every denoising step done, and no ETA while the pixels are being made.
    assert (started.stage, started.step, started.total) == ("decode", 0, 1)
    assert (started.overall_step, started.overall_total, started.eta_s) == (4, 4, None)
    assert sampling_counts(started) == (4, 4)  # A1111: every sampling step done while it decodes
    tracker(ProgressEvent("decode", 1, 1, elapsed_s=5.0))
    done = live["job"]
    assert (done.step, done.total, done.overall_step, done.overall_total) == (1, 1, 4, 4)
    assert (done.eta_s, done.elapsed_s) == (0.0, 5.0)
    assert [(event["stage"], event["step"]) for event in published[-2:]] == [("decode", 0), ("decode", 1)]
    _overall(tracker, live, "base", 2, 3)  # the eager retry of a failed compiled pass, in its base stage
    assert sampling_counts(live["job"]) == (2, 3)  # while denoising: the stage's own count


def test_a_pass_that_starts_again_after_its_decode_counts_from_the_start() -> None:
    tracker, live = _tracker()
    for step in (1, 2, 3):
        _overall(tracker, live, "base", step, 3)
    _overall(tracker, live, "refine", 1, 1)
    tracker(ProgressEvent("decode", 0, 1, elapsed_s=4.0))
    assert _overall(tracker, live, "base", 1, 3) == (1, 4)  # the eager retry, from its first step


class _SlowCopy:
    """A preview whose copy to the host finishes only when the test says so (a GPU still busy)."""

    made: ClassVar[list[_SlowCopy]] = []

    def __init__(self, latents: Any, index: int = 0) -> None:
        self.step = int(latents)  # the test passes the step number as its "latents"
        self.done = False
        _SlowCopy.made.append(self)

    def ready(self) -> bool:
        return self.done

    def data_url(self, max_side: int = 128) -> str:
        assert self.done, "the tracker waited for a copy that was not done"
        return f"preview of step {self.step}"


def test_a_preview_rides_on_the_first_event_after_its_copy_is_done_and_never_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracker_module, "PreviewCopy", _SlowCopy)
    _SlowCopy.made = []
    published: list[dict[str, Any]] = []
    tracker, _ = _tracker(preview_every=2, published=published)

    def step(n: int, total: int = 9) -> dict[str, Any]:
        tracker(ProgressEvent("base", n, total, elapsed_s=float(n), latents=n))
        return published[-1]

    assert "preview" not in step(1)
    assert "preview" not in step(2)  # step 2's copy starts; the GPU is not there yet
    _SlowCopy.made[-1].done = True
    assert step(3)["preview"] == "preview of step 2"  # picked up one step later
    assert "preview" not in step(4)  # step 4's copy started, not done
    assert "preview" not in step(5)
    assert "preview" not in step(6)  # step 6's copy replaces step 4's, which never finished
    _SlowCopy.made[-1].done = True
    assert step(7)["preview"] == "preview of step 6"
    assert "preview" not in step(8)
    assert [copy.step for copy in _SlowCopy.made] == [2, 4, 6, 8]
    # The stage's last step: its copy is not done at its own event, and no step comes after it. The decode's
    # events carry it (before them, the last preview a client saw was step 6's).
    assert "preview" not in step(9)
    tracker(ProgressEvent("decode", 0, 1, elapsed_s=9.5))
    assert "preview" not in published[-1]
    _SlowCopy.made[-1].done = True
    tracker(ProgressEvent("decode", 1, 1, elapsed_s=10.0))
    assert published[-1]["preview"] == "preview of step 9"
    assert [copy.step for copy in _SlowCopy.made] == [2, 4, 6, 8, 9]  # the decode starts none


def test_on_the_cpu_a_preview_rides_on_its_own_steps_event() -> None:
    published: list[dict[str, Any]] = []
    tracker, _ = _tracker(preview_every=2, published=published)
    latents = torch.randn(1, 4, 8, 8)
    for n in (1, 2, 3):
        tracker(ProgressEvent("base", n, 3, elapsed_s=float(n), latents=latents))
    # Step 2 (every 2nd) and step 3 (the stage's last) carry one; step 1 none.
    assert ["preview" in data for data in published] == [False, True, True]
    assert published[1]["preview"].startswith("data:image/jpeg;base64,")
