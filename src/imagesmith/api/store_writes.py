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

from collections.abc import Callable
from typing import TypeVar

from anyio import CapacityLimiter, to_thread
from anyio.lowlevel import RunVar

# The store serializes writes behind one lock anyway, so more threads would only wait there; a few let a
# submit's checks and reads overlap another's write. Far below the default pool's 40, which stays for reads.
STORE_WRITE_THREADS = 8

# One limiter per event loop, as anyio keeps its default one (a TestClient may run a loop per request).
_limiter: RunVar[CapacityLimiter] = RunVar("imagesmith_store_writes")

T = TypeVar("T")


async def in_write_thread(work: Callable[[], T]) -> T:
    """`work` (which writes the store) in a worker thread counted against the writers' limiter."""
    try:
        limiter = _limiter.get()
    except LookupError:
        limiter = CapacityLimiter(STORE_WRITE_THREADS)
        _limiter.set(limiter)
    return await to_thread.run_sync(work, limiter=limiter)
