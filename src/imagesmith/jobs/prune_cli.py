"""`imagesmith prune --older-than 30d`: delete old finished jobs and the images no job points at any more.

cli.py wires it in with add_prune_parser(subparsers); the work is jobs/retention.py's. With the server stopped
only: the server holds the job store's lock, and a prune run beside it stops at once, naming the server's pid.

Exit codes: 0 pruned (or nothing to prune), 1 the store could not be read or written (damaged, a failing disk),
2 bad arguments, no job store in the data dir, or a server has it open (before any work, as serve's 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sqlite3
import sys
from typing import Any

from pydantic import ValidationError

from imagesmith.config import ENV_PREFIX, Settings, get_settings, setting_error_line
from imagesmith.jobs.retention import PruneReport, cutoff_for, prune
from imagesmith.jobs.store import DATABASE_NAME, JobStore, StoreDamaged
from imagesmith.jobs.store_lock import StoreInUse
from imagesmith.storage.files import ImageFiles

_UNIT_SECONDS = {"w": 604800.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
EXIT_OK, EXIT_STORE, EXIT_USAGE = 0, 1, 2


def add_prune_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "prune",
        help="delete old finished jobs and the images no job points at (server stopped)",
        description="Delete the jobs that finished (succeeded, failed or canceled) longer ago than --older-than, "
        "and the image files no remaining job points at. Queued and running jobs are never touched. Run it "
        "with the server stopped: it refuses while one has the data dir open.",
    )
    parser.add_argument(
        "--older-than",
        required=True,
        metavar="AGE",
        help="a number and a unit: w (weeks), d (days), h, m or s; for example 30d or 12h",
    )
    # A string, made a Path by the settings, as serve's --data-dir (an empty value must reach their check).
    parser.add_argument("--data-dir", help="IMAGESMITH_DATA_DIR: the server's jobs database and images")
    parser.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_prune)
    return parser


def parse_age(text: str) -> float | None:
    """Seconds in an age such as 4w, 30d, 12h, 90m or 3600s; None when it is not one."""
    match = _DURATION.fullmatch(text.strip().lower())
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else None


def run_prune(args: argparse.Namespace) -> int:
    def error(message: str) -> int:
        print(f"imagesmith prune: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    older_than_s = parse_age(args.older_than)
    if older_than_s is None:
        return error(
            f"--older-than: {args.older_than!r} is not an age; give a number and a unit, w, d, h, m or s "
            "(for example 30d)"
        )
    try:
        settings = Settings(data_dir=args.data_dir) if args.data_dir is not None else get_settings()
    except ValidationError as invalid:
        lines = [
            setting_error_line(item, "--data-dir")
            for item in invalid.errors()
            if item["loc"][:1] == ("data_dir",)
        ]
        if args.data_dir is None or not lines:
            raise  # the environment's: said as settings by the CLI
        return error(lines[0])
    said_as = "--data-dir" if args.data_dir is not None else f"{ENV_PREFIX}DATA_DIR"
    database = settings.data_dir / DATABASE_NAME
    if not database.is_file():
        return error(
            f"{said_as}: {settings.data_dir} holds no job store ({DATABASE_NAME}); give the data dir the server "
            "uses"
        )
    try:
        store = JobStore(database)
    except StoreInUse as in_use:
        return error(
            f"{database} is open in another imagesmith process (pid {in_use.holder}), a server; stop it first: "
            "a prune must not delete images while a server may be pointing new jobs at them"
        )
    except (StoreDamaged, sqlite3.DatabaseError) as failed:
        print(f"imagesmith prune: cannot open the job store {database}: {failed}", file=sys.stderr)
        return EXIT_STORE
    try:
        report = prune(
            store, ImageFiles(settings.data_dir / "images"), cutoff_for(older_than_s), args.dry_run
        )
    except sqlite3.DatabaseError as failed:  # a full or failing disk: the transaction was rolled back
        print(f"imagesmith prune: the job store {database} refused the prune: {failed}", file=sys.stderr)
        return EXIT_STORE
    finally:
        store.close()
    print(json.dumps(report.as_dict()) if args.json else summary(report))
    return EXIT_OK


def summary(report: PruneReport) -> str:
    verb = "would delete" if report.dry_run else "deleted"
    before = datetime.datetime.fromtimestamp(report.cutoff, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    statuses = ", ".join(f"{count} {status}" for status, count in sorted(report.jobs_by_status.items()))
    jobs = f"{report.jobs_deleted} job(s) finished before {before}" + (f" ({statuses})" if statuses else "")
    return (
        f"imagesmith prune: {verb} {jobs} and {report.images_deleted} image file(s), "
        f"{report.bytes_freed / 1e6:.1f} MB, that no remaining job points at; {report.images_kept} image file(s) "
        "kept"
    )
