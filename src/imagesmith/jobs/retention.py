"""Retention: delete the finished jobs older than a cutoff, then the image files no job points at any more.

Why: the service keeps every job and image it makes, so a content pipeline's data dir grows without end, and
moving files away by hand breaks the jobs that point at them. A prune deletes whole jobs (their rows, results and
Idempotency-Keys) and only the images no remaining job points at: images are content-addressed (storage/files.py),
so two jobs that made the same bytes share one file, and it stays while either job does.

Only with the server stopped: the prune holds the job store's lock (jobs/store_lock.py) for its whole run, as a
server does, so neither can run while the other has the data dir open. A running server's worker could otherwise
point a new job at a file the prune is deleting (the same bytes are one file).

Order, for a crash in the middle: the jobs' rows go first, in one transaction; then the files. A prune cut short
after the rows leaves files no job points at, and the next prune deletes those: it removes every image file
older than the cutoff that no job points at, whoever left it (a job whose success a crash kept from being
recorded and that then failed on its rerun leaves one too). A file written after the cutoff is kept even with no
job: nothing that young is a leftover of the jobs being pruned.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagesmith.jobs.store import JobStore
from imagesmith.storage.files import ImageFiles

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    cutoff: float  # time.time(): jobs finished before it are deleted
    dry_run: bool  # True: what a prune would delete, nothing deleted
    jobs_by_status: dict[str, int] = field(default_factory=dict)
    images_deleted: int = 0
    bytes_freed: int = 0
    images_kept: int = 0  # image files left: a job still points at them, or they are younger than the cutoff

    @property
    def jobs_deleted(self) -> int:
        return sum(self.jobs_by_status.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "jobs_deleted": self.jobs_deleted}


def prune(store: JobStore, files: ImageFiles, cutoff: float, dry_run: bool = False) -> PruneReport:
    """Delete (or with dry_run, count) the jobs finished before `cutoff` and the image files older than it that
    no remaining job points at. The caller holds the store open, which keeps a server out (its lock)."""
    report = PruneReport(cutoff=cutoff, dry_run=dry_run)
    if dry_run:
        old = store.finished_before(cutoff)
        in_use = store.image_names_in_use(ignoring={job.id for job in old})
    else:
        old = store.delete_finished_before(cutoff)
        in_use = store.image_names_in_use()
    report.jobs_by_status = dict(Counter(job.status.value for job in old))
    log.info("prune: %d finished job(s) %s", len(old), "to delete" if dry_run else "deleted")
    for path in sorted(files.stored()):
        size, modified = _size_and_mtime(path)
        if path.name in in_use or modified >= cutoff:
            report.images_kept += 1
            continue
        if not dry_run:
            path.unlink(missing_ok=True)
            _remove_if_empty(path.parent)
        report.images_deleted += 1
        report.bytes_freed += size
    log.info(
        "prune: %d image file(s) %s (%d bytes), %d kept",
        report.images_deleted,
        "to delete" if dry_run else "deleted",
        report.bytes_freed,
        report.images_kept,
    )
    return report


def cutoff_for(older_than_s: float, now: float | None = None) -> float:
    return (time.time() if now is None else now) - older_than_s


def _size_and_mtime(path: Path) -> tuple[int, float]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime


def _remove_if_empty(folder: Path) -> None:
    """A two-character folder left empty; put() makes it again when it needs it."""
    with contextlib.suppress(OSError):  # not empty: other images share its first two hex digits
        folder.rmdir()
