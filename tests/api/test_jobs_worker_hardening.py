"""The worker never strands a job: a failed batch claim runs the job it already holds, batched jobs count their
source attempts, and a job flagged for cancel while it went back to the queue ends canceled. Real SQLite store,
real worker, tiny engine."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from service_helpers import submit_generation

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.jobs.events import EventHub
from imagesmith.jobs.metrics import Metrics
from imagesmith.jobs.service import JobService
from imagesmith.jobs.store import JobRecord, JobStatus, JobStore
from imagesmith.jobs.worker import Worker, asks_stock_first
from imagesmith.sources.generate import GenerateSource
from imagesmith.sources.registry import SourceRegistry
from imagesmith.storage.files import ImageFiles


class RecordingHub(EventHub):
    """An EventHub that remembers every terminal event it sent (a terminal event closes the channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.terminal: dict[str, str] = {}

    def publish(self, job_id: str, type_: str, data: dict[str, Any], terminal: bool = False) -> None:
        if terminal:
            self.terminal[job_id] = type_
        super().publish(job_id, type_, data, terminal)


class Parts:
    def __init__(self, settings: Settings, engine: Engine, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.store = JobStore(path, busy_timeout_s=busy_timeout_s)
        generate = GenerateSource(settings, factory=lambda _: engine)
        generate.start_loading().join()
        self.sources = SourceRegistry([generate])
        self.hub = RecordingHub()
        self.metrics = Metrics(self.store.counts)
        files = ImageFiles(path.parent / "images")
        self.worker = Worker(settings, self.store, files, self.sources, self.hub, self.metrics)
        self.service = JobService(settings, self.store, self.sources, self.hub, self.worker)

    def submit(self, **generation: Any) -> str:
        fields = {"width": 64, "height": 64, "num_inference_steps": 6, **generation}
        return submit_generation(self.store, **fields)

    def job(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        assert job is not None
        return job

    def wait_terminal(self, *ids: str, timeout: float = 60) -> None:
        # The store's row turns terminal a moment before the hub publishes the end (Worker._finish writes, then
        # publishes): wait for both, or an assertion on the hub races the worker thread (seen once in CI).
        wait_for(
            lambda: all(self.job(job_id).status.terminal and job_id in self.hub.terminal for job_id in ids),
            timeout=timeout,
        )


@pytest.fixture
def parts(tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path) -> Any:
    settings = tiny_settings.with_changes(data_dir=tmp_path, batch_max_images=4, batch_window_ms=0)
    made = Parts(settings, tiny_engine, tmp_path / "jobs.sqlite3")
    yield made
    made.worker.stop()
    made.store.close()


def test_a_failed_batch_claim_runs_the_job_already_claimed(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = parts.submit(prompt="a lighthouse", seed=1)
    second = parts.submit(prompt="a lighthouse at night", seed=2)  # compatible: batch company for the first
    claim_where = parts.store.claim_where
    failures: list[int] = []

    def locked_once(*args: Any, **kwargs: Any) -> list[JobRecord]:
        # store.claim(1) asks for one job; the batch claim for company asks for more. Fail that one, once.
        if kwargs.get("limit", args[1] if len(args) > 1 else 1) > 1 and not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        return claim_where(*args, **kwargs)

    monkeypatch.setattr(parts.store, "claim_where", locked_once)
    parts.worker.start()
    parts.wait_terminal(first, second)
    assert failures == [1]
    assert parts.job(first).status is JobStatus.SUCCEEDED and parts.job(first).attempts == 1
    assert parts.job(second).status is JobStatus.SUCCEEDED
    assert parts.hub.terminal[first] == "succeeded"  # its waiters heard the end


def test_batched_jobs_count_their_source_attempts(parts: Parts) -> None:
    ids = [parts.submit(prompt=f"a kite {n}", seed=n) for n in range(3)]
    parts.worker.start()
    parts.wait_terminal(*ids)
    assert all(parts.job(job_id).result["metadata"]["batch_size"] == 3 for job_id in ids)  # type: ignore[index]
    served = parts.metrics.registry.get_sample_value(
        "imagesmith_source_attempts_total", {"source": "generate", "outcome": "served"}
    )
    assert served == 3


def test_a_job_flagged_for_cancel_after_a_requeue_ends_canceled(parts: Parts) -> None:
    """A cancel that read the job running while a shutdown put it back: the row is queued with its cancel flag
    (claims skip it). The next worker (after a restart) must end it, not leave it queued for good."""
    job_id = parts.submit(prompt="never mind", seed=3)
    (claimed,) = parts.store.claim(1)
    parts.store.requeue(claimed.id)  # shutdown: back in the queue
    assert parts.job(job_id).status is JobStatus.QUEUED
    parts.store.request_cancel(job_id)  # the rest of JobService.cancel for a job it read running
    later = parts.submit(prompt="after it", seed=4)
    parts.worker.start()
    parts.wait_terminal(job_id, later)
    assert parts.job(job_id).status is JobStatus.CANCELED and parts.job(job_id).error
    assert parts.hub.terminal[job_id] == "canceled"
    assert parts.job(later).status is JobStatus.SUCCEEDED
    assert parts.store.counts()[JobStatus.QUEUED] == 0


def test_recover_ends_a_queued_job_flagged_for_cancel(tmp_path: Path) -> None:
    """The same row found at startup (the last process stopped before any worker could end it)."""
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    job, _ = store.submit({}, "h", None, queue_max=10)
    store.claim(1)
    store.requeue(job.id)
    store.request_cancel(job.id)
    store.close()
    store = JobStore(path)  # the restart
    assert store.recover(max_attempts=3) == ([], [job.id], [])  # canceled, as asked
    final = store.get(job.id)
    assert final is not None and final.status is JobStatus.CANCELED and final.finished_at is not None
    assert store.counts()[JobStatus.QUEUED] == 0 and store.claim(1) == []
    store.close()


def test_cancel_racing_a_requeue_ends_the_job_at_once(parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    """JobService.cancel reads the job running; the shutdown requeues it before the cancel flag is written."""
    job_id = parts.submit(prompt="too late", seed=5)
    parts.store.claim(1)
    request_cancel = parts.store.request_cancel

    def requeued_first(job: str) -> None:
        parts.store.requeue(job)
        request_cancel(job)

    monkeypatch.setattr(parts.store, "request_cancel", requeued_first)
    assert parts.service.cancel(job_id).status is JobStatus.CANCELED
    assert parts.hub.terminal[job_id] == "canceled"


def test_a_shutdown_does_not_requeue_a_job_whose_cancel_reached_only_the_store(parts: Parts) -> None:
    """The cancel flag is in the store but the running job's token was not tripped by it (the client's cancel
    was between its two steps) when a shutdown stops the job: it ends canceled, not back in the queue."""
    job_id = parts.submit(prompt="a long one", seed=6, num_inference_steps=150)
    parts.worker.start()
    wait_for(lambda: (live := parts.worker.live.get(job_id)) is not None and live.step >= 1, timeout=60)
    parts.store.request_cancel(job_id)  # JobService.cancel's first step; its worker.cancel has not come yet
    parts.worker.stop()  # returns once the job stopped after its current step
    assert parts.job(job_id).status is JobStatus.CANCELED
    assert parts.hub.terminal[job_id] == "canceled"


def test_a_pass_that_breaks_outside_the_jobs_handling_ends_them_failed(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store failing as a job begins escapes every per-job handler: the claimed job must not stay running
    (waiters waiting) until a restart, and the worker must go on with the next job."""
    broken = parts.submit(prompt="unlucky", seed=1, width=96)  # another size: its own pass
    begin = parts.worker._begin
    failures: list[str] = []

    def failing_once(job: JobRecord) -> Any:
        if not failures:
            failures.append(job.id)
            raise sqlite3.OperationalError("disk I/O error")
        return begin(job)

    monkeypatch.setattr(parts.worker, "_begin", failing_once)
    parts.worker.start()
    parts.wait_terminal(broken)
    ended = parts.job(broken)
    assert ended.status is JobStatus.FAILED and ended.error is not None
    assert ended.error["code"] == "internal_error" and "disk I/O error" in ended.error["message"]
    assert parts.hub.terminal[broken] == "failed"
    after = parts.submit(prompt="next one", seed=2)
    parts.wait_terminal(after)
    assert parts.job(after).status is JobStatus.SUCCEEDED


def test_a_job_that_was_running_at_a_crash_runs_alone(parts: Parts) -> None:
    """It may be what killed the process: batched again with the jobs behind it, each crash used up their
    attempts as well as its own (three restarts failed an innocent job sharing its pass)."""
    crashed = parts.submit(prompt="a lighthouse", seed=1)
    behind = [parts.submit(prompt=f"a lighthouse {n}", seed=10 + n) for n in range(2)]  # compatible company
    parts.store.claim(1)  # it was running ...
    assert parts.store.recover(max_attempts=3) == ([crashed], [], [])  # ... when the process died
    parts.worker.start()
    parts.wait_terminal(crashed, *behind)
    assert parts.job(crashed).attempts == 2
    assert parts.job(crashed).result["metadata"]["batch_size"] == 1  # type: ignore[index]
    assert all(parts.job(job_id).result["metadata"]["batch_size"] == 2 for job_id in behind)  # type: ignore[index]


def test_a_job_whose_end_could_not_be_written_is_retried_once_the_store_takes_writes(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the pass failed, and so did writing that it failed. The job stayed "running", its waiters
    waiting, until a restart; now the worker tries again each round and requeues it once the disk has room."""
    job_id = parts.submit(prompt="a full disk", seed=7)
    disk_full = True
    run_batch, finish, release = parts.worker.run_batch, parts.store.finish, parts.store.release_stranded

    def failing_pass(jobs: list[JobRecord]) -> None:
        monkeypatch.setattr(parts.worker, "run_batch", run_batch)  # the next pass runs
        raise OSError(28, "No space left on device")

    def store_write(real: Any) -> Any:
        def write(*args: Any, **kwargs: Any) -> Any:
            if disk_full:
                raise sqlite3.OperationalError("database or disk is full")
            return real(*args, **kwargs)

        return write

    monkeypatch.setattr(parts.worker, "run_batch", failing_pass)
    monkeypatch.setattr(parts.store, "finish", store_write(finish))
    monkeypatch.setattr(parts.store, "release_stranded", store_write(release))
    parts.worker.start()
    wait_for(lambda: parts.worker.run_batch is run_batch)  # the failed pass is over
    threading.Event().wait(1.2)  # two rounds of the loop, their releases refused by the full disk
    assert parts.job(job_id).status is JobStatus.RUNNING
    disk_full = False
    parts.wait_terminal(job_id)
    final = parts.job(job_id)
    assert final.status is JobStatus.SUCCEEDED and final.attempts == 2, final
    assert parts.hub.terminal[job_id] == "succeeded"


def test_a_pass_whose_results_wait_out_another_programs_lock_is_recorded_as_made(
    tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup holds the database's lock longer than the busy timeout just as a pass's images are stored. The
    first job's success could not be written: it was recorded failed ("database is locked") and, that write
    failing too, both jobs of the pass were ended failed or run again. Now the worker waits the lock out."""
    settings = tiny_settings.with_changes(data_dir=tmp_path, batch_max_images=4, batch_window_ms=0)
    parts = Parts(settings, tiny_engine, tmp_path / "jobs.sqlite3", busy_timeout_s=0.3)
    try:
        ids = [parts.submit(prompt=f"a harbour {n}", seed=n) for n in range(2)]
        finish = parts.store.finish
        calls: list[str] = []
        backup = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None, check_same_thread=False)

        def finish_during_a_backup(job_id: str, status: JobStatus, **fields: Any) -> bool:
            if not calls:  # the backup starts as the first result is written, and lasts 4 busy timeouts
                backup.execute("BEGIN IMMEDIATE")
                threading.Timer(1.2, lambda: backup.execute("ROLLBACK")).start()
            calls.append(job_id)
            return finish(job_id, status, **fields)

        monkeypatch.setattr(parts.store, "finish", finish_during_a_backup)
        parts.worker.start()
        parts.wait_terminal(*ids)
        assert calls.count(ids[0]) >= 2  # it did meet the lock, and was written again
        for job_id in ids:
            job = parts.job(job_id)
            assert job.status is JobStatus.SUCCEEDED, job.error
            assert job.attempts == 1 and job.result["metadata"]["batch_size"] == 2  # type: ignore[index]
        backup.close()
    finally:
        parts.worker.stop()
        parts.store.close()


def test_a_stop_while_a_result_waits_out_a_busy_store_leaves_the_job_to_run_again(
    tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stopping while a backup holds the store: the finishing thread slept out its backoff (up to 8 s)
    past the stop's deadline, and the job whose result it held was then ended failed (internal_error) for good,
    its images made. Now the stop wakes it at once and the job stays running, for the next start to run again."""
    import time

    settings = tiny_settings.with_changes(data_dir=tmp_path, batch_window_ms=0)
    parts = Parts(settings, tiny_engine, tmp_path / "jobs.sqlite3", busy_timeout_s=0.3)
    backup = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
    try:
        job_id = parts.submit(prompt="a quay at dusk", seed=3)
        finish = parts.store.finish
        calls: list[JobStatus] = []

        def finish_during_a_backup(job_id: str, status: JobStatus, **fields: Any) -> bool:
            if not calls:
                backup.execute("BEGIN IMMEDIATE")  # held until the test ends it, after the stop
            calls.append(status)
            return finish(job_id, status, **fields)

        monkeypatch.setattr(parts.store, "finish", finish_during_a_backup)
        parts.worker.start()
        # The third try: 0.3 s on the lock, then a 2 s backoff; the stop comes 0.6 s into that.
        wait_for(lambda: len(calls) >= 3, timeout=60)
        time.sleep(0.6)
        started = time.monotonic()
        parts.worker.stop(timeout=10)
        assert time.monotonic() - started < 1.2  # not the backoff's remaining ~1.7 s, nor the 10 s deadline
        assert set(calls) == {JobStatus.SUCCEEDED}  # never written failed
        backup.execute("ROLLBACK")
        assert parts.job(job_id).status is JobStatus.RUNNING
        assert parts.store.recover(max_attempts=3) == ([job_id], [], [])  # the next start runs it again
    finally:
        backup.close()
        parts.worker.stop()
        parts.store.close()


def refuse_the_first_jobs_ends(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, error: sqlite3.OperationalError
) -> tuple[str, str, list[JobStatus]]:
    """Two jobs batched into one pass, the store refusing the first one's end twice with `error`; returns their
    ids and the statuses refused, once both have ended."""
    first, second = (parts.submit(prompt=f"a bridge {n}", seed=n) for n in range(2))
    finish = parts.store.finish
    refused: list[JobStatus] = []

    def failing_for_the_first(job_id: str, status: JobStatus, **fields: Any) -> bool:
        if job_id == first and len(refused) < 2:
            refused.append(status)
            raise error
        return finish(job_id, status, **fields)

    monkeypatch.setattr(parts.store, "finish", failing_for_the_first)
    parts.worker.start()
    parts.wait_terminal(first, second)
    return first, second, refused


def test_a_success_the_store_refuses_for_a_while_is_recorded_as_made_not_run_again(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk I/O error (a failing or full disk, not a lock) as the first job's success was written: it was
    ended failed, that failing too put it back in the queue, and its images were made again (attempts 2), or
    with its attempts used it failed as storage_error though its images were on disk. Now the worker waits the
    store out, as it does a lock, and records the images it made; its batch-mate is not held back."""
    disk = sqlite3.OperationalError("disk I/O error")
    disk.sqlite_errorcode = sqlite3.SQLITE_IOERR  # type: ignore[attr-defined]  # as SQLite raises it
    first, second, refused = refuse_the_first_jobs_ends(parts, monkeypatch, disk)
    assert refused == [
        JobStatus.SUCCEEDED,
        JobStatus.SUCCEEDED,
    ]  # its result written again, never its failure
    for job_id in (first, second):
        job = parts.job(job_id)
        assert job.status is JobStatus.SUCCEEDED and job.attempts == 1, job.error
        assert job.result["metadata"]["batch_size"] == 2  # type: ignore[index]
        assert parts.hub.terminal[job_id] == "succeeded"


def test_a_job_whose_end_cannot_be_written_does_not_end_its_batch_mates(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refusing the first job's end, and then its failure (an error no wait cures: SQL, say), escaped to
    the pass: every job of the pass was ended failed, the second one's images made and stored for nothing."""
    error = sqlite3.OperationalError("no such column: result")
    first, second, refused = refuse_the_first_jobs_ends(parts, monkeypatch, error)
    assert refused == [JobStatus.SUCCEEDED, JobStatus.FAILED]  # its result, then its failure
    mate = parts.job(second)
    assert mate.status is JobStatus.SUCCEEDED and mate.attempts == 1, mate.error
    assert mate.result["metadata"]["batch_size"] == 2  # type: ignore[index]
    again = parts.job(first)  # stranded, then put back in the queue (release_stranded), and run again
    assert again.status is JobStatus.SUCCEEDED and again.attempts == 2, again.error


def test_a_cancel_that_took_effect_is_not_reported_failed_when_the_store_is_busy(
    tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path
) -> None:
    """Cancelling a batched job trips its token, then ends it in the store at once. With the store locked by
    another program that write failed, and the client read "nothing was changed" about a cancel that happened."""
    from imagesmith.engine.progress import CancelToken

    parts = Parts(tiny_settings.with_changes(data_dir=tmp_path), tiny_engine, tmp_path / "jobs.sqlite3", 0.2)
    try:
        job_id = parts.submit(prompt="a lantern", seed=5)
        assert [claimed.id for claimed in parts.store.claim(1)] == [job_id]
        token = CancelToken()
        with parts.worker._tokens_lock:  # the state a running batch leaves: its token, and batched
            parts.worker._tokens[job_id] = token
            parts.worker._batched.add(job_id)
        backup = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
        backup.execute("BEGIN IMMEDIATE")
        try:
            assert parts.worker.cancel(job_id) is True
        finally:
            backup.execute("ROLLBACK")
            backup.close()
        assert token.canceled
        assert parts.job(job_id).status is JobStatus.RUNNING  # ended canceled when its pass ends
    finally:
        parts.store.close()


def test_jobs_wait_in_the_queue_while_the_models_failed_to_load(
    tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path
) -> None:
    """A restart whose models did not load (a wrong path, a GPU gone) failed every job accepted before it, in
    seconds. Health says "failed" and promises accepted jobs are kept: they wait for the restart that works."""
    settings = tiny_settings.with_changes(data_dir=tmp_path, batch_window_ms=0)
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    waiting = [
        submit_generation(store, prompt=f"kept {n}", width=64, height=64, num_inference_steps=6)
        for n in range(2)
    ]

    def no_models(_: Settings) -> Engine:
        raise RuntimeError("no such model folder")

    broken = GenerateSource(settings, factory=no_models)
    broken.start_loading().join()
    worker = Worker(
        settings,
        store,
        ImageFiles(tmp_path / "images"),
        SourceRegistry([broken]),
        EventHub(),
        Metrics(store.counts),
    )
    worker.start()
    threading.Event().wait(1.5)  # three rounds of the worker's loop
    worker.stop()
    assert [store.get(job_id).status for job_id in waiting] == [JobStatus.QUEUED] * 2  # type: ignore[union-attr]
    assert all(store.get(job_id).attempts == 0 for job_id in waiting)  # type: ignore[union-attr]
    store.close()

    restarted = Parts(settings, tiny_engine, path)  # the restart with models that load
    try:
        restarted.worker.start()
        restarted.wait_terminal(*waiting)
        assert all(restarted.job(job_id).status is JobStatus.SUCCEEDED for job_id in waiting)
    finally:
        restarted.worker.stop()
        restarted.store.close()


def test_images_the_disk_refuses_send_the_job_back_to_run_again_not_failed(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full data dir: the images were made, only writing them failed. The job failed as generation_failed at
    once, for good, while health said "ready". Now it goes back in the queue (an attempt spent), claims pause, and
    the next run stores it once the disk has room."""
    import imagesmith.jobs.worker as worker_module

    monkeypatch.setattr(worker_module, "IMAGE_WRITE_PAUSE_S", 0.5)
    job_id = parts.submit(prompt="a full data dir", seed=3)
    put = parts.worker.files.put
    refused: list[str] = []

    def full_disk_once(data: bytes, media_type: str) -> Any:
        if not refused:
            refused.append(media_type)
            raise OSError(28, "No space left on device")
        return put(data, media_type)

    monkeypatch.setattr(parts.worker.files, "put", full_disk_once)
    parts.worker.start()
    parts.wait_terminal(job_id)
    final = parts.job(job_id)
    assert refused and final.status is JobStatus.SUCCEEDED and final.attempts == 2, final.error
    failure = parts.worker.image_write_failure
    assert failure is not None and "No space left on device" in failure[1]


def test_images_the_disk_refuses_every_time_end_the_job_as_a_storage_error(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagesmith.jobs.worker as worker_module

    monkeypatch.setattr(worker_module, "IMAGE_WRITE_PAUSE_S", 0.0)
    job_id = parts.submit(prompt="a failing disk", seed=4)

    def failing_disk(data: bytes, media_type: str) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(parts.worker.files, "put", failing_disk)
    parts.worker.start()
    parts.wait_terminal(job_id)
    final = parts.job(job_id)
    assert final.status is JobStatus.FAILED and final.attempts == parts.worker.settings.max_attempts
    assert final.error is not None and final.error["code"] == "storage_error", final.error
    assert parts.hub.terminal[job_id] == "failed"
    assert parts.metrics.jobs_finished.labels("failed")._value.get() == 1  # counted as every end is


def test_claims_the_disk_refuses_leave_the_worker_running_with_one_line_each(
    parts: Parts, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing disk under the claim: the job stays queued, each failed round says so in one warning (no
    traceback), and the job runs once the store takes writes. The GPU loop and the stock lane share this."""
    job = parts.submit(prompt="a harbour", seed=3)
    claim = parts.store.claim
    refused: list[int] = []

    def refusing_twice(*args: Any, **kwargs: Any) -> list[JobRecord]:
        if len(refused) < 2:
            refused.append(1)
            disk = sqlite3.OperationalError("disk I/O error")
            disk.sqlite_errorcode = sqlite3.SQLITE_IOERR  # type: ignore[attr-defined]  # as SQLite raises it
            raise disk
        return claim(*args, **kwargs)

    monkeypatch.setattr(parts.store, "claim", refusing_twice)
    with caplog.at_level(logging.WARNING, logger="imagesmith.jobs.worker"):
        parts.worker.start()
        parts.wait_terminal(job)
    assert refused == [1, 1]
    assert parts.job(job).status is JobStatus.SUCCEEDED and parts.job(job).attempts == 1
    said = [r for r in caplog.records if "claiming jobs failed" in r.getMessage()]
    assert len(said) == 2 and all(r.levelno == logging.WARNING and r.exc_info is None for r in said)
    assert "the job store cannot be written (disk I/O error); trying again" in said[0].getMessage()


@pytest.mark.parametrize(
    ("request_json", "stock_lane"),
    [
        ({"sources": ["stock", "generate"], "prompt": "a lake"}, True),
        ({"sources": ["stock"], "prompt": "a lake", "generation": {"width": -1}}, True),  # fails on the lane
        ({"sources": ["generate", "stock"], "prompt": "a lake"}, False),
        ({"sources": "stock", "prompt": "a lake"}, False),  # not what any route stores: the GPU loop fails it
        ({"prompt": "a lake"}, False),
    ],
)
def test_one_test_says_which_line_a_stored_request_waits_in(
    request_json: dict[str, Any], stock_lane: bool
) -> None:
    """The claims' predicate and the queue positions' line read the same stored field, so a job's position
    counts the line that will really claim it."""
    assert asks_stock_first(request_json) is stock_lane


def test_a_jobs_end_is_logged_with_its_id_outside_its_context(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch's jobs end one after another outside any one job's context: a job canceled out of a batched
    pass was logged as "job canceled" with no id (found by a black-box session)."""
    job_id = parts.submit(prompt="a quay", seed=4)
    [job] = parts.store.claim(1)
    with caplog.at_level(logging.INFO, logger="imagesmith.jobs.worker"):
        parts.worker._finish(job, JobStatus.CANCELED)
    [ended] = [record for record in caplog.records if record.getMessage() == "job canceled"]
    assert getattr(ended, "job_id", None) == job_id
