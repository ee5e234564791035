"""`imagesmith search "query"` and the Pexels part of `imagesmith doctor`.

cli.py wires them in (it imports this module only if it is installed):

    add_search_parser(subparsers)     # registers "search"; sets func=run_search, as every subcommand does
    return args.func(args)            # run_search(args) -> exit code
    for line in doctor_lines(settings): print(line)   # the Pexels part of `imagesmith doctor`

Exit codes of search: 0 found (and saved, with -o), 1 no results or the photo could not be saved (the work failed,
as generate's 1), 2 not configured or bad arguments (before any work), 3 Pexels refused or failed (key, quota,
network).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from imagesmith.config import Settings, get_settings
from imagesmith.output_file import STDOUT, OutputPathError, planned_output, write_whole
from imagesmith.schemas import OutputFormat
from imagesmith.sources.download import HostPolicy
from imagesmith.sources.errors import (
    DisallowedHost,
    NoStockResults,
    PexelsAuthError,
    PexelsError,
    PexelsNotConfigured,
)
from imagesmith.sources.pexels_client import PexelsClient, PhotoSize, QuotaSnapshot
from imagesmith.sources.stock import StockPhotoSource, StockRequest, StockSearch

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_NO_RESULTS, EXIT_CONFIG, EXIT_PEXELS = 0, 1, 2, 3
EXIT_NOT_SAVED = 1  # the work failed after it ran, as generate's unwritable image
DOCTOR_TIMEOUT_S = 5.0
NO_KEY_MESSAGE = (
    "no Pexels API key configured: get a free key at https://www.pexels.com/api/ and set "
    "IMAGESMITH_PEXELS_API_KEY (environment or .env)"
)


def add_search_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `search` subcommand on an argparse subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "search",
        help="search Pexels stock photos for a query",
        description="Search Pexels, rank the photos for the size asked for, and optionally save the best one "
        "(fitted to the exact size, with its attribution embedded).",
    )
    parser.add_argument("query", nargs="+", help="what to search for")
    # The defaults come from the settings at run time (IMAGESMITH_STOCK_DEFAULT_SIZE), as the API's do.
    parser.add_argument("--width", type=int, help="target width (default: IMAGESMITH_STOCK_DEFAULT_SIZE)")
    parser.add_argument("--height", type=int, help="target height (default: IMAGESMITH_STOCK_DEFAULT_SIZE)")
    parser.add_argument("--color", help="Pexels colour name or hex code, e.g. blue or '#ffaa00'")
    parser.add_argument("--locale", help="search locale, e.g. de-DE")
    parser.add_argument("--min-size", choices=[s.value for s in PhotoSize], help="Pexels' minimum photo size")
    parser.add_argument("-n", "--limit", type=int, default=10, help="results to list (default 10)")
    parser.add_argument(
        "-o", "--output", type=Path, help="save the best photo here (.jpg, .png or .webp; default JPEG)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run_search)
    return parser


def run_search(args: argparse.Namespace, settings: Settings | None = None, out: TextIO | None = None) -> int:
    """Run the search subcommand; returns the process exit code. Everything that can be checked is checked
    before the search, so that a typo costs no API call (and a bad -o path no search and download)."""
    settings = settings or get_settings()
    out = out or sys.stdout
    if settings.pexels_api_key is None:
        return _error(NO_KEY_MESSAGE)
    if args.limit < 1:
        return _error(f"--limit: must be at least 1, got {args.limit}")
    output, output_format = None, OutputFormat.JPEG
    if args.output is not None:
        if args.output == STDOUT:  # the results and the photo's credit are what stdout carries
            return _error(
                "--output: '-' (standard output) is not taken here: it carries the results and the "
                "photographer's credit; name a file (-o photo.jpg)"
            )
        try:
            output, output_format = planned_output(args.output, None, OutputFormat.JPEG)
        except OutputPathError as error:
            return _error(f"--output: {error}")
    default_width, default_height = settings.stock_size()
    try:
        request = StockRequest(
            # As a title, which the search takes as it is: a prompt is cut at its first comma (build_query),
            # and "mountain lake, sunset" searched for "mountain lake".
            title=" ".join(args.query),
            width=default_width if args.width is None else args.width,  # 0 is refused, not the default
            height=default_height if args.height is None else args.height,
            color=args.color,
            locale=args.locale,
            size=PhotoSize(args.min_size) if args.min_size else None,
            output_format=output_format,
        )
    except ValueError as error:
        return _error(_one_line(error))
    try:
        request.query()
    except ValueError:  # a query with no word in it (",,,") is a bad argument, not "no results"
        return _error(f"query: {' '.join(args.query)!r} has no word to search for")
    return asyncio.run(_search(args, output, settings, request, out))


def _error(message: str) -> int:
    print(f"imagesmith search: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


# The request's fields as the options that set them.
_OPTION_FOR_FIELD = {
    "title": "query",
    "width": "--width",
    "height": "--height",
    "color": "--color",
    "locale": "--locale",
}


def _one_line(error: ValueError) -> str:
    """A pydantic error's first problem on one line, named as the option ("--width: Input should be ..."),
    else the message."""
    if isinstance(error, ValidationError) and error.errors():
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        return f"{_OPTION_FOR_FIELD.get(where, where)}: {message}" if where else message
    return str(error)


async def _search(
    args: argparse.Namespace, output: Path | None, settings: Settings, request: StockRequest, out: TextIO
) -> int:
    try:
        source = StockPhotoSource.from_settings(settings)  # opens no connection pool when it raises
    except ValueError as error:  # an entry of IMAGESMITH_PEXELS_ALLOWED_HOSTS that is not a host
        return _error(str(error))
    async with source:
        try:
            found = await source.search(request)
            if not found.photos:
                raise NoStockResults(found.query)
            saved: dict[str, Any] | None = None
            if output is not None:
                photo = await source.fetch(request, found)  # the search above, not a second one
                try:
                    write_whole(output, photo.data)
                except OSError as error:  # the folder went away, no permission, a full disk
                    _error(f"cannot save to {output}: {error.strerror or error}")
                    return EXIT_NOT_SAVED  # not 2: nothing was wrong with the arguments, checked before the search
                # The credit Pexels asks to be shown with the photo: in --json too (it was left out there).
                saved = {
                    "path": str(output),
                    "photo_id": photo.photo_id,
                    "width": photo.width,
                    "height": photo.height,
                    "attribution": photo.attribution.model_dump(),
                }
            _print_results(found, args.limit, args.json, out, saved)
        except NoStockResults as error:
            print(f"no results: {error}", file=sys.stderr)
            return EXIT_NO_RESULTS
        except PexelsError as error:
            print(f"imagesmith search: error: {error}", file=sys.stderr)
            return EXIT_PEXELS
        quota = source.status().quota
        if quota.remaining is not None and not args.json:
            print(f"\nPexels quota: {quota_left(quota)} left", file=out)
    return EXIT_OK


def _print_results(
    found: StockSearch, limit: int, as_json: bool, out: TextIO, saved: dict[str, Any] | None
) -> None:
    shown = found.photos[:limit]
    if as_json:
        payload = {
            "query": found.query,
            "orientation": found.orientation.value,
            "total_results": found.total_results,
            "photos": [photo.model_dump() for photo in shown],
            "saved": saved,  # with -o: the file, and the credit to show with it
        }
        print(json.dumps(payload, indent=2), file=out)
        return
    heading = f"{found.total_results} results for {found.query!r} ({found.orientation.value}), best first:"
    print(heading, file=out)
    for rank, photo in enumerate(shown, 1):
        alt = photo.alt or "(no description)"
        print(f"{rank:>3}. #{photo.id} {photo.width}x{photo.height}  {alt}", file=out)
        print(f"     Photo by {photo.photographer} on Pexels  {photo.url}", file=out)
    if saved is not None:
        credit = saved["attribution"]
        print(
            f"\nsaved photo {saved['photo_id']} ({saved['width']}x{saved['height']}) to {saved['path']}",
            file=out,
        )
        print(f"credit: {credit['credit_text']} ({credit['photo_url']})", file=out)


def quota_left(quota: QuotaSnapshot) -> str:
    """'198/200', or '198' when Pexels sent a malformed limit header (it was printed as '198/None')."""
    left = "unknown" if quota.remaining is None else str(quota.remaining)
    return left + (f"/{quota.limit}" if quota.limit is not None else "")


@dataclass
class PexelsDoctorReport:
    ok: bool
    lines: list[str] = field(default_factory=list)
    # A setting to change (a refused key, an allowed host no search accepts), as against a passing failure (the
    # network, a spent quota: stock photos fall back to generation meanwhile). Only a fault fails `doctor`.
    fault: bool = False


def doctor_lines(settings: Settings, *, online: bool = True) -> list[str]:
    """The Pexels lines of `imagesmith doctor`: with a key set, one quick API call checks it works."""
    return pexels_doctor(settings, online=online).lines


def pexels_doctor(settings: Settings, *, online: bool = False) -> PexelsDoctorReport:
    """What `imagesmith doctor` says about Pexels. online=True spends one API call to check the key."""
    hosts = ", ".join(settings.pexels_allowed_hosts) or "none"
    if settings.pexels_api_key is None:
        lines = [f"pexels: not configured ({NO_KEY_MESSAGE})"]
    else:
        lines = [f"pexels: key set; API {settings.pexels_api_base_url}; downloads from {hosts}"]
    try:
        # What every search would refuse, said here too; also before a key is set, so the user setting up a
        # stand-in or a proxy hears of it now, not on the first search after adding the key.
        policy = HostPolicy(settings.pexels_allowed_hosts)
    except ValueError as error:
        return PexelsDoctorReport(ok=False, lines=[*lines, f"pexels: {error}"], fault=True)
    if settings.pexels_api_key is None:
        return PexelsDoctorReport(ok=False, lines=lines)
    if not online:
        return PexelsDoctorReport(ok=True, lines=lines)
    return asyncio.run(_doctor_online(settings, policy, lines))


async def _doctor_online(settings: Settings, policy: HostPolicy, lines: list[str]) -> PexelsDoctorReport:
    # A health check should answer quickly: no retries and a short timeout, whatever the settings say.
    quick = settings.model_copy(
        update={"pexels_max_retries": 0, "pexels_timeout_s": min(settings.pexels_timeout_s, DOCTOR_TIMEOUT_S)}
    )
    # The API client alone: the check downloads nothing, so the source's downloader and cache are not needed.
    async with PexelsClient.from_settings(quick) as client:
        try:
            found = await client.search("nature", per_page=1)
        except (PexelsNotConfigured, PexelsAuthError) as error:
            return PexelsDoctorReport(ok=False, lines=[*lines, f"pexels: {error}"], fault=True)
        except PexelsError as error:  # the network, the quota: it passes, and generation serves meanwhile
            return PexelsDoctorReport(
                ok=False, lines=[*lines, f"pexels: API check failed (for now): {error}"]
            )
        quota = client.quota.snapshot()
    reset = quota.reset_at.isoformat() if quota.reset_at else "unknown"
    lines.append(f"pexels: API answers; quota {quota_left(quota)} left, resets {reset}")
    refused = _download_refused(policy, found.photos[0].src.original if found.photos else None)
    if refused is not None:
        # Every search would then end in "no photo" (404 no_results): a setting to change, said here.
        lines.append(
            f"pexels: its photos cannot be downloaded: {refused}; add their origin to "
            "IMAGESMITH_PEXELS_ALLOWED_HOSTS (or unset it for images.pexels.com)"
        )
        return PexelsDoctorReport(ok=False, lines=lines, fault=True)
    return PexelsDoctorReport(ok=True, lines=lines)


def _download_refused(policy: HostPolicy, photo_url: str | None) -> str | None:
    """Why the allowed hosts refuse the API's own photo URL, as each download would; None if they take it (or
    the search found no photo to try)."""
    if photo_url is None:
        return None
    try:
        policy.check(photo_url)
    except DisallowedHost as error:
        return str(error)
    return None
