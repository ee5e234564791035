"""The batch window counts from a job's submission (Worker._claim_company): compatible jobs already queued join
at once, a job that has already waited the window in the queue is not held back again, and only a job younger
than the window waits, for what is left of it, while its pass has room. Counted from the claim instead, the GPU
idled a whole window before every pass under load. Real SQLite store and worker; the claims alone, no pass runs.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.jobs.queue_timing import generation_worker
from imagesmith.jobs.store import JobStatus, JobStore
from imagesmith.jobs.worker import Worker
from imagesmith.schemas import GenerationRequest
from imagesmith.sources.base import ImageRequest, SourceName

LONG_WINDOW_MS = 5000  # far longer than a claim takes, so whether a claim waited it is plain


def job_request(width: int = 64) -> dict[str, Any]:
    generation = GenerationRequest(prompt="a lighthouse", width=width, height=64, num_inference_steps=4)
    return ImageRequest(sources=[SourceName.GENERATE], generation=generation).model_dump(mode="json")


Parts = tuple[JobStore, Worker, Callable[[int], str]]


@pytest.fixture
def make_parts(
    tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path
) -> Iterator[Callable[[int], Parts]]:
    stores: list[JobStore] = []

    def make(window_ms: int) -> Parts:
        settings = tiny_settings.with_changes(
            data_dir=tmp_path, batch_max_images=4, batch_window_ms=window_ms
        )
        store = JobStore(tmp_path / "jobs.sqlite3")
        stores.append(store)
        worker = generation_worker(tiny_engine, settings, store, tmp_path / "images")

        def submit(width: int = 64) -> str:
            request = job_request(width)
            key = hashlib.sha256(f"{request}{time.monotonic_ns()}".encode()).hexdigest()
            job, _ = store.submit(request, key, None, queue_max=100)
            worker.notify()  # as the service does after a submit
            return job.id

        return store, worker, submit

    yield make
    for store in stores:
        store.close()


def age_queued_jobs(database: Path, seconds: float) -> None:
    """As if every job in the store had been submitted `seconds` earlier (queued behind a running pass)."""
    with sqlite3.connect(database) as db:
        db.execute("UPDATE jobs SET created_at = created_at - ?", (seconds,))


def timed_claim(worker: Worker) -> tuple[list[str], float]:
    began = time.monotonic()
    jobs = worker._claim()
    return [job.id for job in jobs], time.monotonic() - began


def test_jobs_that_waited_the_window_in_the_queue_run_at_once(
    make_parts: Callable[[int], Parts], tmp_path: Path
) -> None:
    store, worker, submit = make_parts(LONG_WINDOW_MS)
    ids = [submit(), submit()]
    other_size = submit(width=96)  # cannot share the pass: stays queued
    age_queued_jobs(tmp_path / "jobs.sqlite3", LONG_WINDOW_MS / 1000 + 1)
    claimed, seconds = timed_claim(worker)
    assert claimed == ids
    assert seconds < LONG_WINDOW_MS / 1000 / 2, f"the claim waited {seconds:.2f}s for company"
    queued = store.get(other_size)
    assert queued is not None and queued.status is JobStatus.QUEUED


def test_a_full_pass_does_not_wait_for_the_window(make_parts: Callable[[int], Parts]) -> None:
    _, worker, submit = make_parts(LONG_WINDOW_MS)
    ids = [submit() for _ in range(5)]  # batch_max_images 4: the fifth waits for the next pass
    claimed, seconds = timed_claim(worker)
    assert claimed == ids[:4]
    assert seconds < LONG_WINDOW_MS / 1000 / 2, f"a full pass waited {seconds:.2f}s"


def test_a_young_job_waits_out_its_window_for_company(make_parts: Callable[[int], Parts]) -> None:
    window_s = 1.5
    store, worker, submit = make_parts(int(window_s * 1000))
    first = submit()
    arrivals: list[str] = []
    late = threading.Timer(0.3, lambda: arrivals.append(submit()))
    late.start()
    claimed, seconds = timed_claim(worker)
    late.join()
    returned_at = time.time()
    # The company that came 0.3 s in joined, and the pass, still with room, waited for the rest of the window,
    # which counts from the first job's submission (the store's clock).
    assert claimed == [first, *arrivals]
    submitted = store.get(first)
    assert submitted is not None and returned_at - submitted.created_at >= window_s * 0.95
    assert seconds < window_s + 2, f"the claim took {seconds:.2f}s"


def test_a_claim_that_fails_in_the_window_runs_the_jobs_already_claimed(
    make_parts: Callable[[int], Parts], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, worker, submit = make_parts(LONG_WINDOW_MS)
    first, second = submit(), submit()
    calls = {"count": 0}
    claim_where = store.claim_where

    def failing_third_claim(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1  # 1: the first job, 2: the company queued with it, 3: after a new job's notify
        if calls["count"] == 3:
            raise sqlite3.OperationalError("database is locked")
        return claim_where(*args, **kwargs)

    monkeypatch.setattr(store, "claim_where", failing_third_claim)
    late = threading.Timer(0.3, submit)
    late.start()
    claimed, seconds = timed_claim(worker)
    late.join()
    # The two jobs already RUNNING in the store run; the third, whose claim failed, waits in the queue.
    assert claimed == [first, second] and seconds < LONG_WINDOW_MS / 1000 / 2
    jobs, total = store.list_jobs(None, limit=10, offset=0)
    assert total == 3 and sorted(job.status.value for job in jobs) == ["queued", "running", "running"]


def test_pausing_claims_ends_the_wait_for_company(make_parts: Callable[[int], Parts]) -> None:
    _, worker, submit = make_parts(LONG_WINDOW_MS)
    first = submit()
    pause = threading.Timer(0.3, worker.pause_claims)  # what a server stopping does
    pause.start()
    claimed, seconds = timed_claim(worker)
    pause.join()
    assert claimed == [first] and seconds < LONG_WINDOW_MS / 1000 / 2, f"the claim took {seconds:.2f}s"
