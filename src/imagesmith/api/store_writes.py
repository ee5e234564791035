"""Routes that write the job store (submit, cancel) run that work in threads of their own.

Plain `def` routes and dependencies (health, job views, listings, /metrics) run in Starlette's default thread
pool, 40 threads. A write can wait long for the database: another program holding its write lock (a backup, the
sqlite3 shell) makes it wait out SQLite's busy timeout (30 s, JobStore), and the store lets one write in at a
time. When the writes took threads from that pool, 40 submits waiting on such a lock took all of them, and health
and every GET (which read on their own connection and never wait for a writer, WAL) queued behind them: health
stopped answering exactly when an operator looked. Writes get a small limiter of their own instead; the ones past
it wait for a token on the event loop, holding no thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import anyio
from anyio import CapacityLimiter, to_thread
from anyio.lowlevel import RunVar

from imagesmith.jobs.store import JobStore, WriteLockTimeout, write_lock_deadline

# The store serializes writes behind one lock anyway, so more threads would only wait there; a few let a
# submit's checks and reads overlap another's write. Far below the default pool's 40, which stays for reads.
STORE_WRITE_THREADS = 8

# Per event loop, as anyio keeps its default limiter (a TestClient may run a loop per request). `_writers`: the
# tokens a request waits for, with a deadline. `_threads`: what the thread of a request holding a token runs
# under; never short of tokens (each runner holds a writer's token first), it only keeps those threads out of
# the default pool.
_writers: RunVar[CapacityLimiter] = RunVar("imagesmith_store_writers")
_threads: RunVar[CapacityLimiter] = RunVar("imagesmith_store_write_threads")

T = TypeVar("T")


def _limiter(var: RunVar[CapacityLimiter]) -> CapacityLimiter:
    try:
        return var.get()
    except LookupError:
        limiter = CapacityLimiter(STORE_WRITE_THREADS)
        var.set(limiter)
        return limiter


async def in_write_thread(work: Callable[[], T], store: JobStore) -> T:
    """`work` (which writes `store`) in a thread of the writers' own. Waiting for that thread and for the
    store's write lock take one busy timeout at most together (WriteLockTimeout, a 503 past it): a request
    waits at most that, then SQLite's own busy timeout. Without the first bound, 24 submits behind another
    program's lock were answered 1, 2 and 3 timeouts late, eight at a time."""
    busy_timeout_s = store.busy_timeout_s
    deadline = time.monotonic() + busy_timeout_s
    writers = _limiter(_writers)
    with anyio.move_on_after(busy_timeout_s) as waited:
        await writers.acquire()
    if waited.cancelled_caught:
        raise WriteLockTimeout.after(busy_timeout_s)
    try:
        with write_lock_deadline(deadline):  # the thread copies this context, and with it the deadline
            return await to_thread.run_sync(work, limiter=_limiter(_threads))
    finally:
        writers.release()
