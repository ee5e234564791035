"""Finishing a pass off the GPU's path: encoding its files, storing them and ending its jobs on another thread.

After each pass the worker used to encode the images (~0.2 s for one 1024x1024 PNG on the H200's host) and write
the store before it claimed the next job, and the GPU sat idle all that time: at batch 1 the queue kept 78 % of
the engine's rate (1.08 of 1.38 images/s, docs/benchmarks.md). Now the worker claims the next jobs, then hands
that work to one finishing thread, so the next pass runs while this one is encoded. (Claimed after the hand-over,
the claim waited for the GIL behind the finishing thread: up to 9 ms instead of 1, run 85; Worker._submit_finishing.)
Pillow's encoders release the GIL, so the GPU thread keeps queuing its steps meanwhile.

The finishing thread runs passes in the order they ended. `submit` waits while one pass is already waiting to be
finished, so a slow disk slows intake rather than piling up passes: at most three passes' pictures are held (one
being finished, one waiting, one whose worker waits to hand it over), and a job's end lags its pass by two passes
at most.

No accepted job is lost on the way: a job stays "running" in the store until its finish is written, and one
left running by a crash is put back in the queue at the next start (JobStore.recover).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from imagesmith.engine.output import encode_in_parallel
from imagesmith.sources.base import SourceImage

log = logging.getLogger(__name__)

Work = Callable[[], None]


class Finisher:
    """One thread that runs submitted work in order; before start() and after close(), work runs inline."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Work | None] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        # Held from a submit's look at the thread to its put, and by close() as it takes the thread away: work
        # submitted while a close runs goes in before the close's end marker or runs inline, never after the
        # marker, where no thread would ever run it (a stop that timed out closes while the worker still runs).
        self._handing_over = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="imagesmith-finish", daemon=True)
        self._thread.start()

    def submit(self, work: Work) -> None:
        with self._handing_over:
            if self._thread is not None:
                self._queue.put(work)  # waits while a pass waits: the thread takes it without this lock
                return
        _run(work)

    def close(self, timeout: float = 60.0) -> bool:
        """Finish everything submitted, then stop the thread; later work runs inline. Returns whether all of it
        was done within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        if not self._handing_over.acquire(timeout=timeout):
            return False
        try:
            thread, self._thread = self._thread, None
        finally:
            self._handing_over.release()
        if thread is None:
            return True
        try:
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            return False
        thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    def _loop(self) -> None:
        while (work := self._queue.get()) is not None:
            _run(work)


def _run(work: Work) -> None:
    try:
        work()
    except BaseException:  # the work ends its own jobs on errors; whatever escapes, the thread must live on,
        # or the next submit would wait forever on a queue no one empties
        log.exception("finishing a pass failed")


def encode_pending(images: Sequence[SourceImage]) -> None:
    """Make the files of every still-pending image at once, on the encoding threads (engine/output.py says why).
    An image whose encoder fails stays pending: reading its `data` raises that error again, for its own job."""
    encode_in_parallel([functools.partial(_make_file, image) for image in images if image.pending])


def _make_file(image: SourceImage) -> bytes:
    try:
        return image.data
    except Exception:  # its job reads `data` again and fails with this error; the pass's other images go on
        log.exception("encoding an image failed")
        return b""
