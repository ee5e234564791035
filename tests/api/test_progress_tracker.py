"""The worker's progress for one job: steps over every stage, with an ETA, also when a pass starts again.

The engine runs a pass again, eagerly, when a compiled pass fails inside torch.compile (engine.generate_batch):
its progress events then restart at the first step of the first stage.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from imagesmith.engine.progress import ProgressEvent
from imagesmith.jobs.worker import _Tracker


def _tracker() -> tuple[_Tracker, dict[str, Any]]:
    live: dict[str, Any] = {}
    worker = SimpleNamespace(
        planned_steps=lambda request: {"base": 3, "refine": 1},
        live=live,
        settings=SimpleNamespace(preview_every=0),
        hub=SimpleNamespace(publish=lambda *args: None),
    )
    return _Tracker(worker, SimpleNamespace(id="job"), None), live  # type: ignore[arg-type]


def _overall(tracker: _Tracker, live: dict[str, Any], stage: str, step: int, total: int) -> tuple[int, int]:
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
