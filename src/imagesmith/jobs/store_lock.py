"""One process per job store.

At start a server requeues every job the store says is running (recover()): those were running in a process
that died. A second process on the same data dir, even one that then fails to bind its port, would requeue
jobs the first is running, and both would run them. An exclusive lock on a file beside the database, held
while the store is open, keeps the second one out. The kernel releases it when the holder exits, kill -9
included, so a restart after a crash is never locked out.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StoreInUse(RuntimeError):
    """Another live process has this job store open: `holder` is its pid ("unknown" when it could not write it)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def lock_path_for(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def lock_store(database: Path) -> int:
    """Take the store's lock (a file descriptor, to pass to unlock_store); StoreInUse, naming the holder's pid,
    when another process has it."""
    fd = os.open(lock_path_for(database), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StoreInUse(
            f"{database} is in use by another imagesmith process (pid {holder}); stop that one, or give this one "
            "its own IMAGESMITH_DATA_DIR",
            holder,
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))  # for the message above, in the process locked out
    except OSError:
        pass  # a full disk: the lock holds without the pid (the message then says "unknown")
    return fd


def unlock_store(fd: int) -> None:
    os.close(fd)  # closing the descriptor releases the lock
