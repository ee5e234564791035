"""Ending the threads that run torch before the interpreter shuts down.

Why: a thread still inside torch, or one that ends, while the interpreter finalizes aborts the whole process
("terminate called without an active exception", exit 134; torch issue #38228). Taking the GIL during
finalization calls pthread_exit, and torch takes it in noexcept code: the destructor that releases the GIL
around an op, and the thread-exit destructor of the Python objects a thread stashed in torch's C++ storage
(engine/gpu_thread.py's ensure_cudagraph_tree_state does). Seen as a CI run that died after all its tests passed
(engines' GPU threads closed by weakref.finalize at exit), and as Ctrl-C during a server's warm-up.

At exit this module asks every registered owner of such a thread to stop (a GPU thread runs nothing more; a
warm-up stops within a step), all of them first, then waits for all their threads against one deadline. A
thread that is still running then (a compile or a model load, which cannot be interrupted) would abort the
process, so the process ends at once instead, through os._exit with the code the CLI chose, after flushing its
logs: what a clean exit would have done, less the interpreter's shutdown.

A SIGTERM from uvicorn never gets here: uvicorn re-raises the signal after its graceful shutdown, and the
default action ends the process without finalization (nothing to abort).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol
from weakref import WeakSet

log = logging.getLogger(__name__)

# The longest the exit waits, for all threads together: a pass or a warm-up stops within a step (well under a
# second on a GPU); what is still running after this cannot be stopped (a compile, a model load).
EXIT_WAIT_S = 10.0


class StopsForExit(Protocol):
    def stop_for_exit(self) -> threading.Thread | None:
        """Ask the thread to end soon and start nothing more; return it (None: no thread to wait for)."""


_OWNERS: WeakSet[StopsForExit] = WeakSet()
# The code a forced exit uses: the CLI sets the one it is about to return; 1 for anything else.
_exit_code = 1


def register(owner: StopsForExit) -> None:
    _OWNERS.add(owner)


def set_exit_code(code: int) -> None:
    global _exit_code
    _exit_code = code


def end_threads(owners: Iterable[StopsForExit], wait_s: float) -> list[threading.Thread]:
    """Stop every owner's thread, then wait for all of them up to `wait_s` seconds in all. Returns the threads
    still running. Stopping all first: waiting on one owner must not let another run its queued work."""
    threads = []
    for owner in list(owners):
        thread = owner.stop_for_exit()
        if thread is not None and thread is not threading.current_thread():
            threads.append(thread)
    deadline = time.monotonic() + wait_s
    try:
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if not thread.is_alive():
                _wait_until_os_thread_gone(thread.native_id, deadline)
    except KeyboardInterrupt:  # Ctrl-C again while waiting: the user wants out now
        log.warning("exit: stopped waiting for the engine's threads")
    return [thread for thread in threads if thread.is_alive()]


def _wait_until_os_thread_gone(native_id: int | None, deadline: float) -> None:
    """join() returns when the thread's Python state is released, before its C++ thread-local destructors run;
    on Linux the thread leaves /proc/self/task only after them (elsewhere this returns at once)."""
    if native_id is None:
        return
    task = Path(f"/proc/self/task/{native_id}")
    while task.exists() and time.monotonic() < deadline + 1.0:
        time.sleep(0.001)


@atexit.register
def _end_threads_before_finalizing() -> None:
    running = end_threads(_OWNERS, EXIT_WAIT_S)
    if not running:
        return
    log.warning(
        "exit: %s still running after %.0fs (a compile or a model load cannot be stopped); ending the process "
        "now, skipping the interpreter's shutdown, which would abort with a thread inside torch",
        ", ".join(thread.name for thread in running),
        EXIT_WAIT_S,
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_code)
