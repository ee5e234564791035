"""Standard output that cannot be written (a full disk, a closed pipe, /dev/full): one line and exit 1.

Why: every command prints its result to stdout, and a print that failed came out as an OSError traceback, after
the work was done (`generate > /dev/full` had written its image). Worse, with stdout buffered the failure came
only from the interpreter's own flush at exit: "Exception ignored ..." and exit code 120, which no command
documents. The CLI runs each command with stdout wrapped by `guarded_stdout()`: a write or flush that fails
raises `StdoutUnwritable`, which says which stream failed (an OSError from another file must stay that file's
error), and the CLI flushes stdout itself before it returns, so the failure is said in one line with exit 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class StdoutUnwritable(Exception):
    """Standard output refused a write or a flush; `error` is the OSError it raised."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


class _GuardedStdout:
    """sys.stdout as it was, but for write and flush, whose OSError becomes StdoutUnwritable."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            raise StdoutUnwritable(error) from error

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            raise StdoutUnwritable(error) from error

    def __getattr__(self, name: str) -> Any:  # buffer, fileno, isatty, encoding, ...: the stream's own
        return getattr(self._stream, name)


@contextmanager
def guarded_stdout() -> Iterator[None]:
    """sys.stdout guarded for the block (left as it is when there is none: a closed stdout), flushed at its end,
    and restored after it."""
    stream = sys.stdout
    if stream is None:
        yield
        return
    sys.stdout = _GuardedStdout(stream)
    try:
        yield
        sys.stdout.flush()  # here, where a failure can be said: at the interpreter's exit it is exit 120
    finally:
        sys.stdout = stream


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null once stdout has failed, so the interpreter's own flush of what is
    still buffered at exit succeeds instead of printing a second error (the recipe in Python's signal docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno() if sys.stdout is not None else 1)
        os.close(devnull)
    except (OSError, ValueError):  # no descriptor (a test's captured stream): nothing to flush at exit
        pass
