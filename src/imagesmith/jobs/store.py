"""The job store: SQLite in WAL mode, the one record of every accepted job and its result.

The database is also the queue: queued jobs are taken in insertion order (seq), so a restart resumes exactly
where the last process stopped. Every state change is one short transaction, synchronous=FULL, so an accepted
job survives kill -9 and power loss alike. Live progress (step counts) is deliberately not written here: it
changes many times a second and is worthless after a crash.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from imagesmith.jobs.store_lock import lock_store, unlock_store

# The error of a canceled job, by where the cancel found it.
CANCELED_WHILE_QUEUED: dict[str, str] = {"code": "canceled", "message": "canceled while queued"}
CANCELED_WHILE_RUNNING: dict[str, str] = {"code": "canceled", "message": "canceled while running"}


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class QueueFull(Exception):
    def __init__(self, depth: int) -> None:
        super().__init__(f"the queue is full ({depth} jobs queued or running)")
        self.depth = depth


class StoreDamaged(RuntimeError):
    """The database file fails SQLite's integrity check."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


@dataclass
class JobRecord:
    id: str
    seq: int
    status: JobStatus
    request: dict[str, Any]
    attempts: int
    cancel_requested: bool
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    def terminal_event_data(self) -> dict[str, Any]:
        """The last event's payload for a finished job: the same whether it is sent live or replayed."""
        return {"job_id": self.id, "status": self.status.value, "result": self.result, "error": self.error}

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        return cls(
            id=row["id"],
            seq=row["seq"],
            status=JobStatus(row["status"]),
            request=_loads_text(row["request"]),
            attempts=row["attempts"],
            cancel_requested=bool(row["cancel_requested"]),
            result=_loads_text(row["result"]) if row["result"] else None,
            error=_loads_text(row["error"]) if row["error"] else None,
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
        )


def _loads_text(stored: str) -> Any:
    """A stored JSON column, with any half of a UTF-16 surrogate pair in its strings read as U+FFFD.

    The API refuses such strings since api/text_check.py; a store written before that can hold them (an unchecked
    `keywords` item), and a string that cannot be encoded as UTF-8 made every response holding the job a 500."""
    value = json.loads(stored)
    # json.dumps escapes every non-ASCII character: a surrogate escape is the only way one can be in there.
    return _as_text(value) if "\\ud" in stored.lower() else value


_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a pair's two escapes: any left is alone


def _as_text(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_as_text(item) for item in value]
    if isinstance(value, dict):
        return {_as_text(key): _as_text(item) for key, item in value.items()}
    return value


def result_image_names(result: dict[str, Any] | None) -> list[str]:
    """The image file names a job's result points at (each image's url ends in /v1/images/NAME)."""
    images = (result or {}).get("images") or []
    return [
        str(image["url"]).rsplit("/", 1)[-1] for image in images if isinstance(image, dict) and "url" in image
    ]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
"""

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
TERMINAL = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELED.value)
# A finished job's end; a row from before finished_at was always written falls back on its creation.
_FINISHED_BEFORE = "status IN (?, ?, ?) AND COALESCE(finished_at, created_at) < ?"
DATABASE_NAME = "jobs.sqlite3"  # in IMAGESMITH_DATA_DIR


class WriteLockTimeout(sqlite3.OperationalError):
    """A write waited busy_timeout_s for the store's write lock: another write held it that long, waiting on a
    lock another program holds on the database. The same answer as SQLite's own busy timeout (a 503
    storage_unavailable to a client), and no later than it."""

    @classmethod
    def after(cls, busy_timeout_s: float) -> WriteLockTimeout:
        return cls(
            f"the job store stayed busy for {busy_timeout_s:.0f} s (another program holds a lock on the "
            "database, or it is very slow)"
        )


# When the writes of the current context stop waiting for the write lock (time.monotonic()), if sooner than one
# busy timeout from each write's start. The API sets it around a request's writes: with the wait for a writer
# thread counted in, a request waits for the lock at most one busy timeout in all, then SQLite's own at most one.
_write_lock_deadline: ContextVar[float | None] = ContextVar("imagesmith_write_lock_deadline", default=None)


@contextmanager
def write_lock_deadline(deadline: float) -> Iterator[None]:
    """Writes made in this context (and in threads started from it, which copy the context) wait for the write
    lock until `deadline` at the latest."""
    token = _write_lock_deadline.set(deadline)
    try:
        yield
    finally:
        _write_lock_deadline.reset(token)


def sqlite_result_code(error: BaseException) -> int | None:
    """The primary SQLite result code of an error SQLite raised (sqlite3.SQLITE_BUSY, ...; an extended code keeps
    it in its low byte); None for one it did not raise (ours, such as WriteLockTimeout)."""
    code = getattr(error, "sqlite_errorcode", None)  # set on errors SQLite raised (Python 3.11+)
    return None if code is None else code & 0xFF


# SQLite's result codes for a write the same store may take later: a lock held (busy, locked), a full disk, an
# I/O error, a read-only file. Anything else (SQL, schema, a damaged file) is a bug or a broken store.
STORE_TRANSIENT_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_READONLY,
    }
)


def store_unwritable(error: BaseException) -> bool:
    """Whether a write failed for a reason that can pass (store_busy's, a full or failing disk, a read-only
    file): the same write may succeed later."""
    return isinstance(error, WriteLockTimeout) or sqlite_result_code(error) in STORE_TRANSIENT_CODES


def store_busy(error: BaseException) -> bool:
    """Whether a write failed only because it waited out a lock (this store's, or SQLite's held by another
    program): the same write can succeed later. A full disk or a broken file is not busy."""
    return isinstance(error, WriteLockTimeout) or sqlite_result_code(error) in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


def damaged_store_message(path: Path, problem: str) -> str:
    return (
        f"{path} is damaged ({problem}); stop imagesmith, move the file aside (or restore a backup) "
        "and start again: a new store is made, and the jobs in the damaged one are not run"
    )


class Recovered(NamedTuple):
    """What a start found of the last process's unfinished work (JobStore.recover), by job id."""

    requeued: list[str]  # left running: back in the queue, at their place
    canceled: list[str]  # a cancel was asked before the stop: ended canceled, as asked
    given_up: list[str]  # left running on their last attempt: failed, "interrupted"


class JobStore:
    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        # How long a write waits for the database (SQLite's busy timeout) and, before that, for this store's
        # write lock. Bounding the second too: with only SQLite's, 50 submits behind another program's lock were
        # answered one busy timeout after another, the last after 25 minutes; now each within ~2 timeouts (the
        # API's writes: store_writes.py).
        self.busy_timeout_s = busy_timeout_s
        self.last_write_at: float | None = None  # time.monotonic() of the last write that changed rows
        # (time.monotonic(), the error) of the last write that failed for a reason that can pass (a full disk, a
        # lock held past the busy timeout), whoever wrote: health says so until a later write commits.
        self.last_write_failure: tuple[float, str] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._store_lock = lock_store(path)  # StoreInUse when another process has it (store_lock.py)
        try:
            # One connection for writes, shared by the request threads and the worker, serialized by a lock:
            # every statement is short, and SQLite serializes writers anyway.
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s
            )
            self._db.row_factory = sqlite3.Row
            self._lock = threading.Lock()
            with self._lock:
                try:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute("PRAGMA synchronous=FULL")
                    self._db.executescript(_SCHEMA)
                    self._check_intact(path)
                except sqlite3.OperationalError:
                    raise  # locked, a full disk, no permission: the file itself may be fine
                except sqlite3.DatabaseError as error:
                    # "file is not a database", "database disk image is malformed": damage that a statement or
                    # quick_check itself stops on, before quick_check can list it, said with the same fix.
                    raise StoreDamaged(damaged_store_message(path, str(error))) from error
            # And one for reads (health, job views, listings), with its own lock. In WAL mode a read never waits
            # for a writer: behind the write lock, a claim waiting out another program's lock on the database
            # (a backup, the sqlite3 shell) held health and every GET for up to the 30 s busy timeout.
            self._reader = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s
            )
            self._reader.row_factory = sqlite3.Row
            self._read_lock = threading.Lock()
        except BaseException:
            if hasattr(self, "_db"):
                self._db.close()
            unlock_store(self._store_lock)
            raise

    def _check_intact(self, path: Path) -> None:
        """A damaged page started "ready", then failed listings with 500s: refuse to start instead, with the
        fix. quick_check reads every page once (well under a second for a job store)."""
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            first = " ".join(" ".join(problems).split())[:200]  # one line: quick_check's rows span several
            raise StoreDamaged(damaged_store_message(path, first))

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()
        unlock_store(self._store_lock)

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """The write lock, waited for at most busy_timeout_s (WriteLockTimeout past that), and SQLite's busy
        timeout set to what is left of the same wait while it is held: a write that waited for the store's lock
        behind one stuck on another program's lock then waited SQLite's whole 30 s again (a lone submit was
        answered after 58 s), where the docs promise one busy timeout."""
        now = time.monotonic()
        end = now + self.busy_timeout_s
        deadline = _write_lock_deadline.get()
        if deadline is not None:  # a request that waited already for a thread to write in (store_writes.py)
            end = min(end, deadline)
        try:
            if not self._lock.acquire(timeout=max(0.0, end - now)):
                raise WriteLockTimeout.after(self.busy_timeout_s)
            try:
                changes = self._db.total_changes
                self._db.execute(f"PRAGMA busy_timeout = {max(1, round((end - time.monotonic()) * 1000))}")
                try:
                    yield  # every write runs here: autocommitted, or a whole transaction (_writing)
                finally:
                    self._db.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout_s * 1000)}")
                # Health: a failed write before this one is over. Only a write that changed rows says so: a claim
                # of an empty queue commits an empty transaction even on a disk that takes no writes.
                if self._db.total_changes > changes:
                    self.last_write_at = time.monotonic()
            finally:
                self._lock.release()
        except sqlite3.OperationalError as error:
            if store_unwritable(error):  # health: whoever wrote, the API or the worker
                self.last_write_failure = (time.monotonic(), str(error))
            raise

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The write connection in one IMMEDIATE transaction, under the write lock: committed when the block
        ends (a return inside it included), rolled back when it raises."""
        with self._write_lock():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")  # inside the try: a commit that fails (a full disk) is rolled back
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _one(
        self, sql: str, args: tuple[Any, ...] = (), db: sqlite3.Connection | None = None
    ) -> sqlite3.Row | None:
        row: sqlite3.Row | None = (db or self._db).execute(sql, args).fetchone()
        return row

    def submit(
        self, request: dict[str, Any], request_hash: str, idempotency_key: str | None, queue_max: int
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job, or return the one made earlier with the same Idempotency-Key (created=False).

        The bound check and the insert share one write transaction, so concurrent submits never overshoot it.
        """
        with self._writing():
            if idempotency_key is not None:
                # Checked again inside the write transaction: a concurrent submit with the same key may have
                # inserted since the caller's find_idempotent().
                existing = self._idempotent(idempotency_key, request_hash)
                if existing is not None:
                    return existing, False
            depth_row = self._one("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", ACTIVE)
            depth = int(depth_row[0]) if depth_row else 0
            if depth >= queue_max:
                raise QueueFull(depth)
            job_id = uuid.uuid4().hex
            self._db.execute(
                "INSERT INTO jobs (id, status, request, request_hash, idempotency_key, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    JobStatus.QUEUED.value,
                    json.dumps(request),
                    request_hash,
                    idempotency_key,
                    time.time(),
                ),
            )
            row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        assert row is not None
        return JobRecord.from_row(row), True

    def find_idempotent(self, idempotency_key: str, request_hash: str) -> JobRecord | None:
        """The job made earlier with this Idempotency-Key (None when there is none); IdempotencyConflict when
        it was made from a different request. A read only: the service replays without admitting anew."""
        with self._read_lock:
            return self._idempotent(idempotency_key, request_hash, self._reader)

    def _idempotent(
        self, idempotency_key: str, request_hash: str, db: sqlite3.Connection | None = None
    ) -> JobRecord | None:
        row = self._one("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,), db)
        if row is None:
            return None
        if row["request_hash"] != request_hash:
            raise IdempotencyConflict("this Idempotency-Key was used with a different request body")
        return JobRecord.from_row(row)

    def get(self, job_id: str) -> JobRecord | None:
        with self._read_lock:
            row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,), self._reader)
        return JobRecord.from_row(row) if row else None

    def list_jobs(
        self, statuses: Collection[JobStatus] | None, limit: int, offset: int
    ) -> tuple[list[JobRecord], int]:
        """Newest first; with statuses, the jobs in any of them (none given: every job)."""
        values = tuple(dict.fromkeys(status.value for status in statuses or ()))
        where = f"WHERE status IN ({', '.join('?' * len(values))})" if values else ""
        with self._read_lock:
            self._reader.execute("BEGIN")  # one snapshot: the page and the total agree
            try:
                rows = self._reader.execute(
                    f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", (*values, limit, offset)
                ).fetchall()
                total_row = self._one(f"SELECT COUNT(*) FROM jobs {where}", values, self._reader)
            finally:
                self._reader.execute("COMMIT")
        return [JobRecord.from_row(row) for row in rows], int(total_row[0]) if total_row else 0

    def oldest_queued(self, limit: int) -> list[JobRecord]:
        """The queued jobs the worker will claim next (oldest first, none flagged for cancel), left queued."""
        with self._read_lock:
            rows = self._claimable_rows(limit, self._reader)
        return [JobRecord.from_row(row) for row in rows]

    def _claimable_rows(self, limit: int, db: sqlite3.Connection | None = None) -> list[sqlite3.Row]:
        """The oldest queued jobs not flagged for cancel: what claim_where picks from (caller holds the lock)."""
        return (
            (db or self._db)
            .execute(
                "SELECT * FROM jobs WHERE status = ? AND cancel_requested = 0 ORDER BY seq LIMIT ?",
                (JobStatus.QUEUED.value, limit),
            )
            .fetchall()
        )

    def claim(self, limit: int = 1) -> list[JobRecord]:
        """Move the oldest queued jobs (FIFO) to running, counting an attempt for each."""
        return self.claim_where(lambda _: True, limit, scan=limit)

    def claim_where(
        self, accept: Callable[[JobRecord], bool], limit: int, scan: int = 200
    ) -> list[JobRecord]:
        """Claim up to `limit` queued jobs that `accept` (oldest first, looking at the `scan` oldest): how the
        worker gathers jobs that can share a pipeline pass with the one it already holds."""
        if limit <= 0:
            return []
        with self._writing():
            rows = self._claimable_rows(scan)
            ids: list[str] = []
            for row in rows:
                if len(ids) >= limit:
                    break
                if accept(JobRecord.from_row(row)):
                    ids.append(row["id"])
            now = time.time()
            for job_id in ids:
                self._db.execute(
                    "UPDATE jobs SET status = ?, attempts = attempts + 1, started_at = ? WHERE id = ?",
                    (JobStatus.RUNNING.value, now, job_id),
                )
            claimed = [self._one("SELECT * FROM jobs WHERE id = ?", (job_id,)) for job_id in ids]
        return [JobRecord.from_row(row) for row in claimed if row is not None]

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Record a running job's outcome; result and status land together, so a job never succeeds twice."""
        with self._write_lock():
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ? WHERE id = ? AND status = ?",
                (
                    status.value,
                    json.dumps(result) if result is not None else None,
                    json.dumps(error) if error is not None else None,
                    time.time(),
                    job_id,
                    JobStatus.RUNNING.value,
                ),
            )
        return cursor.rowcount == 1

    def cancel_queued(self, job_id: str) -> bool:
        return bool(self._end_queued_as_canceled("id = ?", (job_id,)))

    def request_cancel(self, job_id: str) -> None:
        """Remember a cancel of a running job, so a crash before it stops does not bring it back."""
        with self._write_lock():
            self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    def requeue(self, job_id: str) -> bool:
        """Put a running job back at its place in the queue without counting the attempt (clean shutdown).

        False when it was not put back: not running, or a cancel was asked for it (claims skip such rows, so
        requeued it would wait forever; the caller ends it as canceled instead)."""
        with self._write_lock():
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, attempts = MAX(attempts - 1, 0), started_at = NULL "
                "WHERE id = ? AND status = ? AND cancel_requested = 0",
                (JobStatus.QUEUED.value, job_id, JobStatus.RUNNING.value),
            )
        return cursor.rowcount == 1

    def cancel_flagged_queued(self) -> list[JobRecord]:
        """End as canceled the queued jobs whose cancel was asked while they ran (a cancel racing a requeue, or a
        crash in between): claims skip them, so without this they would stay queued forever. Returns them, so
        the caller can send their terminal events."""
        return self._end_queued_as_canceled("cancel_requested = 1", ())

    def _end_queued_as_canceled(self, where: str, params: tuple[Any, ...]) -> list[JobRecord]:
        """The queued jobs matching `where`, ended as canceled (flagged too, so a crash cannot revive them)."""
        with self._write_lock():
            rows = self._db.execute(
                "UPDATE jobs SET status = ?, cancel_requested = 1, finished_at = ?, error = ? "
                f"WHERE status = ? AND {where} RETURNING *",
                (
                    JobStatus.CANCELED.value,
                    time.time(),
                    json.dumps(CANCELED_WHILE_QUEUED),
                    JobStatus.QUEUED.value,
                    *params,
                ),
            ).fetchall()
        return [JobRecord.from_row(row) for row in rows]

    def recover(self, max_attempts: int) -> Recovered:
        """After a crash: jobs left running go back to the queue (keeping their place), unless they were
        canceled or have used their attempts; queued jobs flagged for cancel end canceled. Returns the ids of
        each kind."""

        def interrupted(attempts: int) -> dict[str, str]:
            return {
                "code": "interrupted",
                "message": f"the server stopped during each of {attempts} attempts; giving up",
            }

        with self._writing():
            rows = self._db.execute(
                "SELECT id, attempts, cancel_requested FROM jobs WHERE status = ?", (JobStatus.RUNNING.value,)
            ).fetchall()
            requeued, canceled, given_up = self._release_running(rows, max_attempts, interrupted)
        # A cancel that raced the last shutdown's requeue left its job queued; no one is listening yet.
        canceled += [job.id for job in self.cancel_flagged_queued()]
        return Recovered(requeued, canceled, given_up)

    def release_stranded(self, job_id: str, max_attempts: int) -> JobRecord | None:
        """A running job whose end could not be written (a full disk): what recover() would do with it at the
        next start, done now, so it does not stay "running", its waiters waiting, until a restart. None when
        it is not running."""

        def unstorable(attempts: int) -> dict[str, str]:
            return {
                "code": "storage_error",
                "message": f"its result could not be stored (the disk full or failing) in {attempts} attempt(s)",
            }

        with self._writing():
            rows = self._db.execute(
                "SELECT id, attempts, cancel_requested FROM jobs WHERE id = ? AND status = ?",
                (job_id, JobStatus.RUNNING.value),
            ).fetchall()
            self._release_running(rows, max_attempts, unstorable)
            row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,)) if rows else None
        return JobRecord.from_row(row) if row else None

    def _release_running(
        self, rows: list[sqlite3.Row], max_attempts: int, gave_up: Callable[[int], dict[str, str]]
    ) -> tuple[list[str], list[str], list[str]]:
        """Running jobs no process is running any more: canceled if a cancel was asked, failed with
        gave_up(attempts) once their attempts are used, else back in the queue at their place. The caller holds
        the lock inside a transaction. Returns (requeued ids, canceled ids, failed ids)."""
        requeued: list[str] = []
        canceled: list[str] = []
        failed: list[str] = []
        now = time.time()
        for row in rows:
            if row["cancel_requested"]:
                status, error = JobStatus.CANCELED, CANCELED_WHILE_RUNNING
            elif row["attempts"] >= max_attempts:
                status, error = JobStatus.FAILED, gave_up(row["attempts"])
            else:
                self._db.execute(
                    "UPDATE jobs SET status = ?, started_at = NULL WHERE id = ?",
                    (JobStatus.QUEUED.value, row["id"]),
                )
                requeued.append(row["id"])
                continue
            self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                (status.value, json.dumps(error), now, row["id"]),
            )
            (canceled if status is JobStatus.CANCELED else failed).append(row["id"])
        return requeued, canceled, failed

    def finished_before(self, cutoff: float) -> list[JobRecord]:
        """The finished jobs (succeeded, failed or canceled) that ended before `cutoff` (a time.time()), oldest
        first: what a prune with that cutoff deletes (jobs/retention.py)."""
        with self._read_lock:
            rows = self._reader.execute(
                f"SELECT * FROM jobs WHERE {_FINISHED_BEFORE} ORDER BY seq", (*TERMINAL, cutoff)
            ).fetchall()
        return [JobRecord.from_row(row) for row in rows]

    def delete_finished_before(self, cutoff: float) -> list[JobRecord]:
        """Delete the jobs finished_before(cutoff) would list, in one transaction; returns them. Their
        Idempotency-Keys go with them: a retry with one of those keys afterwards makes a new job."""
        with self._writing():
            rows = self._db.execute(
                f"DELETE FROM jobs WHERE {_FINISHED_BEFORE} RETURNING *", (*TERMINAL, cutoff)
            ).fetchall()
        return sorted((JobRecord.from_row(row) for row in rows), key=lambda job: job.seq)

    def image_names_in_use(self, ignoring: Collection[str] = ()) -> set[str]:
        """The file names (sha256.ext) of the images that jobs' results point at, the jobs with an id in
        `ignoring` left out."""
        left_out = set(ignoring)
        with self._read_lock:
            rows = self._reader.execute("SELECT id, result FROM jobs WHERE result IS NOT NULL").fetchall()
        return {
            name
            for row in rows
            if row["id"] not in left_out
            for name in result_image_names(_loads_text(row["result"]))
        }

    def counts(self) -> dict[JobStatus, int]:
        with self._read_lock:
            rows = self._reader.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        counts = dict.fromkeys(JobStatus, 0)
        counts.update({JobStatus(row["status"]): row["n"] for row in rows})
        return counts

    def queue_positions(self, line_of: Callable[[dict[str, Any]], str] | None = None) -> dict[str, int]:
        """Each queued job's id -> how many queued jobs are ahead of it, in one query (a listing of 100 jobs
        used to count once per job). `line_of`: which line a job waits in, from its request (the worker's stock
        lane and its GPU loop do not wait for each other), so only jobs in its own line count; None: one line."""
        with self._read_lock:
            rows = self._reader.execute(
                "SELECT id, request FROM jobs WHERE status = ? ORDER BY seq", (JobStatus.QUEUED.value,)
            ).fetchall()
        ahead: Counter[str] = Counter()
        positions = {}
        for row in rows:
            line = "" if line_of is None else line_of(json.loads(row["request"]))
            positions[row["id"]] = ahead[line]
            ahead[line] += 1
        return positions
