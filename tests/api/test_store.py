"""The job store alone: FIFO, the bound, idempotency, crash recovery with bounded attempts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagesmith.jobs.store import IdempotencyConflict, JobStatus, JobStore, QueueFull, StoreDamaged
from imagesmith.jobs.store_lock import StoreInUse


def test_fifo_bound_and_idempotency(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    a, _ = store.submit({"n": 1}, "h1", None, queue_max=2)
    b, created = store.submit({"n": 2}, "h2", "key", queue_max=2)
    assert created
    same, created = store.submit({"n": 2}, "h2", "key", queue_max=2)
    assert same.id == b.id and not created  # a replay never counts against the bound
    with pytest.raises(IdempotencyConflict):
        store.submit({"n": 3}, "h3", "key", queue_max=2)
    with pytest.raises(QueueFull):
        store.submit({"n": 3}, "h3", None, queue_max=2)
    assert [job.id for job in store.claim(1)] == [a.id]
    assert [job.id for job in store.claim(1)] == [b.id]
    assert store.claim(1) == []


def test_queue_positions_count_the_queued_jobs_ahead(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    a, b, c, d = (store.submit({"n": n}, f"h{n}", None, queue_max=10)[0] for n in range(4))
    assert store.queue_positions() == {a.id: 0, b.id: 1, c.id: 2, d.id: 3}
    store.claim(1)  # a runs
    assert store.cancel_queued(c.id)
    assert store.queue_positions() == {b.id: 0, d.id: 1}


def test_queue_positions_count_only_the_jobs_in_the_same_line(tmp_path: Path) -> None:
    """With the worker's stock lane, a generation queued behind stock jobs is not waiting for them: its
    position said 2 while it ran first (a black-box session)."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    lines = ["stock", "stock", "generate", "stock", "generate"]
    jobs = [store.submit({"sources": [line]}, f"h{n}", None, queue_max=10)[0] for n, line in enumerate(lines)]
    positions = store.queue_positions(lambda request: request["sources"][0])
    assert [positions[job.id] for job in jobs] == [0, 1, 0, 2, 1]


def test_list_filters_by_any_of_the_statuses_given_newest_first(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    a, b, c = (store.submit({"n": n}, f"h{n}", None, queue_max=10)[0] for n in range(3))
    store.claim(1)  # a runs; b and c stay queued
    assert store.cancel_queued(c.id)

    def listed(*statuses: JobStatus) -> tuple[list[str], int]:
        jobs, total = store.list_jobs(statuses, 10, 0)
        return [job.id for job in jobs], total

    assert listed(JobStatus.RUNNING, JobStatus.CANCELED) == ([c.id, a.id], 2)
    assert listed(JobStatus.QUEUED, JobStatus.QUEUED) == ([b.id], 1)  # a repeat counts once
    assert listed() == ([c.id, b.id, a.id], 3)  # none given: every job
    assert listed(JobStatus.SUCCEEDED) == ([], 0)


def test_recover_requeues_running_until_attempts_run_out(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    job, _ = store.submit({}, "h", None, queue_max=10)
    for attempt in (1, 2):
        (claimed,) = store.claim(1)
        assert claimed.attempts == attempt
        store.close()
        store = JobStore(path)  # a restart after a crash
        requeued, _, given_up = store.recover(max_attempts=2)
        if attempt == 1:
            assert requeued == [job.id] and not given_up
    assert given_up == [job.id]
    final = store.get(job.id)
    assert final is not None and final.status is JobStatus.FAILED and final.error
    assert final.error["code"] == "interrupted"


def test_finish_is_once(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    job, _ = store.submit({}, "h", None, queue_max=10)
    store.claim(1)
    assert store.finish(job.id, JobStatus.SUCCEEDED, result={"images": []})
    assert not store.finish(job.id, JobStatus.FAILED, error={"code": "x"})
    assert store.counts()[JobStatus.SUCCEEDED] == 1


def test_one_process_at_a_time_opens_a_store(tmp_path: Path) -> None:
    """A second server on the data dir (even one that then failed to bind its port) ran recover() and
    requeued the jobs the first was running, and both ran them. The lock is the kernel's: closing the store
    or the process dying (kill -9) releases it."""
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    with pytest.raises(StoreInUse, match=rf"in use by another imagesmith process \(pid {os.getpid()}\)"):
        JobStore(path)
    store.close()
    JobStore(path).close()


def test_a_damaged_store_is_refused_with_the_fix(tmp_path: Path) -> None:
    """One bad page started "ready", and listing jobs then failed with 500s."""
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    for n in range(300):
        store.submit({"pad": "x" * 2000, "n": n}, f"h{n}", None, queue_max=1000)
    store.close()
    data = bytearray(path.read_bytes())
    page = 4096 * 40  # a leaf page of the jobs table, well past the schema on page 1
    data[page + 100 : page + 2100] = b"\x5a" * 2000
    path.write_bytes(bytes(data))
    with pytest.raises(
        StoreDamaged, match=r"is damaged \(\*\*\* in database main \*\*\* On tree page 41"
    ) as caught:
        JobStore(path)
    assert "move the file aside (or restore a backup)" in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "jobs.sqlite3").unlink()
    JobStore(path).close()  # the lock was let go when the check failed: a fresh store opens


@pytest.mark.parametrize("damage", ["not a database", "cut short", "a page's type"])
def test_a_store_too_damaged_to_open_is_refused_with_the_fix_too(tmp_path: Path, damage: str) -> None:
    """Damage the first statement or the integrity check itself stops on: a bare "file is not a database" or
    "database disk image is malformed", with no path and no fix."""
    path = tmp_path / "jobs.sqlite3"
    if damage == "not a database":
        path.write_bytes(bytes(range(256)) * 400)
    else:
        store = JobStore(path)
        for n in range(300):
            store.submit({"pad": "x" * 2000, "n": n}, f"h{n}", None, queue_max=1000)
        store.close()
        data = bytearray(path.read_bytes())
        if damage == "cut short":
            del data[len(data) // 2 :]
        else:  # a b-tree page whose type byte is no type: quick_check raises instead of listing problems
            data[8 * 4096] = 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(StoreDamaged) as caught:
        JobStore(path)
    message = str(caught.value)
    assert str(path) in message and "move the file aside (or restore a backup)" in message, message
    path.unlink()
    JobStore(path).close()  # the lock was let go: a fresh store opens


def test_reads_do_not_wait_behind_a_write_stuck_on_another_programs_lock(tmp_path: Path) -> None:
    """A backup or the sqlite3 shell holding the database's write lock: a claim waits it out (up to the 30 s
    busy timeout) holding the store's write lock, and health, job views and listings waited behind it."""
    import sqlite3
    import threading
    import time

    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    job, _ = store.submit({"n": 1}, "h1", None, queue_max=10)
    outside = sqlite3.connect(path, isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")  # another program's write lock
    claimed: list[object] = []
    claimer = threading.Thread(target=lambda: claimed.append(store.claim(1)))
    claimer.start()
    time.sleep(0.3)  # the claim is waiting on the database now, holding the write connection's lock
    assert claimer.is_alive()
    started = time.monotonic()
    assert store.counts()[JobStatus.QUEUED] == 1
    found = store.get(job.id)
    assert found is not None and found.status is JobStatus.QUEUED
    assert store.list_jobs(None, 10, 0)[1] == 1 and store.queue_positions() == {job.id: 0}
    assert time.monotonic() - started < 1.0
    outside.execute("ROLLBACK")
    claimer.join(10)
    assert [claimed_job.id for claimed_job in claimed[0]] == [job.id]  # type: ignore[attr-defined]
    store.close()


def test_writes_queued_behind_another_programs_lock_each_give_up_within_two_busy_timeouts(
    tmp_path: Path,
) -> None:
    """Six submits behind another program's lock on the database: one waits out SQLite's busy timeout holding
    the store's write lock, the others wait for that lock. Before the lock's wait was bounded they were answered
    one busy timeout after another (six here, 50 submits 25 minutes with the default 30 s)."""
    import sqlite3
    import threading
    import time

    from imagesmith.jobs.store import WriteLockTimeout

    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path, busy_timeout_s=1.0)
    outside = sqlite3.connect(path, isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")  # another program's write lock, held throughout
    outcomes: list[tuple[float, BaseException | None]] = []
    started = time.monotonic()

    def submit(n: int) -> None:
        try:
            store.submit({"n": n}, f"h{n}", None, queue_max=10)
            outcomes.append((time.monotonic() - started, None))
        except sqlite3.OperationalError as error:
            outcomes.append((time.monotonic() - started, error))

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    outside.execute("ROLLBACK")
    assert len(outcomes) == 6 and all(error is not None for _, error in outcomes)
    assert any(isinstance(error, WriteLockTimeout) for _, error in outcomes)
    assert max(seconds for seconds, _ in outcomes) < 3.5  # unbounded: ~6 s
    assert store.counts()[JobStatus.QUEUED] == 0
    job, created = store.submit({"n": 9}, "h9", None, queue_max=10)  # the lock gone, writes go through again
    assert created and store.get(job.id) is not None
    store.close()


def test_a_write_behind_one_stuck_on_another_programs_lock_gives_up_within_one_busy_timeout(
    tmp_path: Path,
) -> None:
    """A lone submit behind the worker's write, both stuck on another program's lock: it waited for the store's
    lock, then SQLite's whole busy timeout again (58 s with the default 30 s). Both waits now share one."""
    import sqlite3
    import threading
    import time

    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path, busy_timeout_s=2.0)
    outside = sqlite3.connect(path, isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")  # another program's write lock, held throughout
    first_failed: list[BaseException] = []

    def first_write() -> None:
        try:
            store.submit({}, "a", None, queue_max=10)
        except sqlite3.OperationalError as error:
            first_failed.append(error)

    first = threading.Thread(target=first_write)
    first.start()
    time.sleep(1.0)  # the first write now holds the store's lock, waiting on SQLite's
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError):
        store.submit({}, "b", None, queue_max=10)
    waited = time.monotonic() - started
    first.join(10)
    outside.execute("ROLLBACK")
    outside.close()
    assert waited < 2.6, waited  # one busy timeout and scheduling; two waits were ~3.0
    assert first_failed  # it gave up too, after its own busy timeout
    _, created = store.submit({}, "c", None, queue_max=10)  # and the default timeout is back for the next
    assert created and store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 2000
    store.close()


def test_api_writes_behind_another_programs_lock_are_answered_within_two_busy_timeouts(
    tmp_path: Path,
) -> None:
    """The routes' path (store_writes.in_write_thread): 24 submits, more than its 8 writer threads. Those waiting
    for a thread waited without limit: answered 1, 2 and 3 busy timeouts late, eight at a time."""
    import sqlite3
    import time

    import anyio

    from imagesmith.api.store_writes import in_write_thread
    from imagesmith.jobs.store import WriteLockTimeout

    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path, busy_timeout_s=1.0)
    outside = sqlite3.connect(path, isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")  # another program's write lock, held throughout
    answers: list[tuple[float, BaseException | None]] = []

    async def submits() -> None:
        started = time.monotonic()

        async def submit(n: int) -> None:
            try:
                await in_write_thread(lambda: store.submit({"n": n}, f"h{n}", None, queue_max=100), store)
                answers.append((time.monotonic() - started, None))
            except sqlite3.OperationalError as error:
                answers.append((time.monotonic() - started, error))

        async with anyio.create_task_group() as group:
            for n in range(24):
                group.start_soon(submit, n)

    try:
        anyio.run(submits)
    finally:
        outside.execute("ROLLBACK")
        outside.close()
    assert len(answers) == 24 and all(error is not None for _, error in answers)
    assert sum(isinstance(error, WriteLockTimeout) for _, error in answers) >= 16  # most never reached SQLite
    assert max(seconds for seconds, _ in answers) < 2.7, sorted(round(seconds, 2) for seconds, _ in answers)
    assert store.counts()[JobStatus.QUEUED] == 0
    store.close()


def test_recover_counts_a_job_canceled_while_running_as_canceled_not_given_up(tmp_path: Path) -> None:
    """The start's log said "0 back in the queue, 1 given up" for a job that ended canceled, as asked."""
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    job, _ = store.submit({}, "h", None, queue_max=10)
    store.claim(1)
    store.request_cancel(job.id)  # asked while it ran; then the process died
    store.close()
    store = JobStore(path)
    assert store.recover(max_attempts=3) == ([], [job.id], [])
    final = store.get(job.id)
    assert final is not None and final.status is JobStatus.CANCELED


def test_a_write_the_store_refuses_is_recorded_for_health_whoever_wrote_it(tmp_path: Path) -> None:
    """Only the API's failed writes reached health: while the worker could not end or claim a job (a failing
    disk, another program's lock), health said "ready". The store now records its own failed writes, and a later
    write that changes rows clears them (a claim of an empty queue commits on a disk that takes no writes)."""
    import sqlite3
    import types

    from imagesmith.api.health import recent_store_failure

    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path, busy_timeout_s=0.2)
    job, _ = store.submit({"n": 1}, "h1", None, queue_max=10)
    app = types.SimpleNamespace(state=types.SimpleNamespace())  # an app whose API saw no failure
    assert recent_store_failure(app, store) is None  # type: ignore[arg-type]
    outside = sqlite3.connect(path, isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")  # another program's write lock, past the busy timeout
    with pytest.raises(sqlite3.OperationalError):
        store.claim(1)  # the worker's write
    said = recent_store_failure(app, store)  # type: ignore[arg-type]
    assert said is not None and "the job store could not be written" in said, said
    assert "finished jobs wait to be recorded" in said
    outside.execute("ROLLBACK")
    assert not store.cancel_queued("no-such-job")  # commits, but changes nothing: proves no write was taken
    assert recent_store_failure(app, store) is not None  # type: ignore[arg-type]
    assert [claimed.id for claimed in store.claim(1)] == [job.id]  # a write that changed rows: it is over
    assert recent_store_failure(app, store) is None  # type: ignore[arg-type]
    outside.close()
    store.close()
