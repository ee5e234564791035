"""An async client for the Pexels API v1: photo search and photo by id, with quota tracking and retries.

    async with PexelsClient.from_settings(settings) as client:
        page = await client.search("mountain lake", orientation=Orientation.LANDSCAPE, per_page=30)
        photo = await client.get_photo(page.photos[0].id)

Quota: every answer carries X-Ratelimit-Limit / -Remaining / -Reset (UNIX seconds). When Remaining reaches 0,
or on a 429 (which carries none of them), the client stops calling until the reset (or, with no reset known,
for `quota_backoff_s`) and raises PexelsQuotaExhausted(retry_at) without touching the network.

The rate-limit headers are checked before they are kept: a reset that is not a plausible UNIX time in seconds
(one in milliseconds, 'inf', a year 2300) or a Retry-After beyond a day is ignored or capped, with a warning, so
that no header can make the quota's datetimes (health, metrics, the job worker) fail.

Retries: 5xx, timeouts, network errors and broken answers from the far end are retried `max_retries` times with
exponential backoff and jitter; 401/403, 404, 429 and other 4xx are not, since repeating them cannot help, nor is
a request that cannot be sent at all (a key with a line break inside, a base URL without http(s)://), which is
reported as a configuration error.

The key goes only into the Authorization header of API requests (never onto the client object's default
headers, so a shared or logged client cannot leak it); it is a SecretStr everywhere else.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from imagesmith.sources.errors import (
    PexelsAuthError,
    PexelsBadResponse,
    PexelsNotConfigured,
    PexelsNotFound,
    PexelsQuotaExhausted,
    PexelsUnavailable,
)
from imagesmith.sources.retry import (
    Retryable,
    is_retryable_status,
    read_at_most,
    with_retries,
    within_deadline,
)

if TYPE_CHECKING:
    from imagesmith.config import Settings

logger = logging.getLogger(__name__)
_M = TypeVar("_M", bound=BaseModel)

MAX_PER_PAGE = 80  # the API's own ceiling

# Bounds on what the rate-limit headers may say. Pexels' quota is monthly, so its reset is at most about a month
# away; a value outside these bounds is a unit mix-up (milliseconds) or garbage from a proxy, and kept, it would
# overflow datetime.fromtimestamp on every health check.
EARLIEST_RESET_EPOCH = 946_684_800.0  # 2000-01-01
MAX_RESET_AHEAD_S = 40 * 86_400.0
MAX_API_BODY_BYTES = 2_000_000  # decoded; an 80-photo search page is about 100 KB
MAX_PHOTO_SIDE = 100_000  # pixels; Pexels' largest originals are under 20,000
MAX_RETRY_AFTER_S = 86_400.0  # a 429 never holds calls back longer than a day


# --- the API's shapes --------------------------------------------------------------------------------------


class Orientation(StrEnum):
    LANDSCAPE = "landscape"
    PORTRAIT = "portrait"
    SQUARE = "square"


class PhotoSize(StrEnum):
    """Pexels' minimum-size filter: large 24 MP, medium 12 MP, small 4 MP."""

    LARGE = "large"
    MEDIUM = "medium"
    SMALL = "small"


class PexelsPhotoSrc(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    original: str
    large2x: str = ""
    large: str = ""
    medium: str = ""
    small: str = ""
    portrait: str = ""
    landscape: str = ""
    tiny: str = ""


class PexelsPhoto(BaseModel):
    """One photo as the API describes it; `url` is its page on pexels.com."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int
    # Bounded: a 400-digit width overflowed the ranking (an error for the query, cached for a day).
    width: int = Field(gt=0, le=MAX_PHOTO_SIDE)
    height: int = Field(gt=0, le=MAX_PHOTO_SIDE)
    url: str
    photographer: str
    photographer_url: str
    photographer_id: int | None = None
    avg_color: str | None = None
    src: PexelsPhotoSrc
    liked: bool = False
    alt: str | None = ""


class PexelsSearchPage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    total_results: int = 0
    page: int = 1
    per_page: int = 0
    # Required: a 200 without it (a proxy's error page as JSON) is a bad answer, not "no results" (which the
    # search cache kept for a day, after Pexels was back).
    photos: list[PexelsPhoto]
    next_page: str | None = None
    prev_page: str | None = None


# --- quota -------------------------------------------------------------------------------------------------


class QuotaSnapshot(BaseModel):
    """What health and metrics report about the rate limit."""

    limit: int | None = None
    remaining: int | None = None
    reset_at: datetime | None = None
    blocked_until: datetime | None = None
    blocked_reason: str | None = None


def _as_datetime(epoch_s: float | None) -> datetime | None:
    """The UTC time, or None when unknown or beyond datetime's range (the header checks keep such values out;
    this is the last guard, so that snapshot() cannot raise)."""
    if epoch_s is None:
        return None
    try:
        return datetime.fromtimestamp(epoch_s, tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _iso(epoch_s: float) -> str:
    moment = _as_datetime(epoch_s)
    return moment.isoformat() if moment else f"UNIX time {epoch_s}"


def _finite_number(raw: str) -> float | None:
    """The text as a finite number, else None ('inf' and '1e999' parse as floats but fit no int or datetime)."""
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _number_header(headers: Mapping[str, str], name: str) -> float | None:
    """The header as a finite number; None when absent, and (with a warning) when not a finite number."""
    raw = headers.get(name)
    if raw is None:
        return None
    value = _finite_number(raw)
    if value is None:
        logger.warning("Pexels sent %s %r, not a finite number; ignored", name, raw[:40])
    return value


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = _number_header(headers, name)
    return None if value is None else int(value)


@dataclass
class QuotaTracker:
    """The rate limit as last reported, and whether calls are held back.

    `clock` returns UNIX seconds; tests pass a fake one to reach the reset without waiting for it.
    """

    default_block_s: float = 900.0
    clock: Callable[[], float] = time.time
    limit: int | None = None
    remaining: int | None = None
    reset_epoch: float | None = None
    blocked_until: float | None = None
    blocked_reason: str | None = None

    def check(self) -> None:
        """Raise PexelsQuotaExhausted while blocked; lift the block once its time has come."""
        if self.blocked_until is None:
            return
        if self.clock() < self.blocked_until:
            raise PexelsQuotaExhausted.at_epoch(
                self.blocked_until,
                f"Pexels quota exhausted ({self.blocked_reason}); calls resume at {_iso(self.blocked_until)}",
            )
        logger.info("Pexels quota block lifted; calling the API again")
        self.blocked_until = self.blocked_reason = None
        self.remaining = None  # unknown until the next answer says

    def observe(self, headers: Mapping[str, str]) -> None:
        """Record the rate-limit headers of an answer; block when Remaining reaches 0."""
        limit = _int_header(headers, "X-Ratelimit-Limit")
        remaining = _int_header(headers, "X-Ratelimit-Remaining")
        reset = _number_header(headers, "X-Ratelimit-Reset")
        if limit is not None:
            self.limit = limit
        if remaining is not None:
            self.remaining = remaining
        if reset is not None:
            if EARLIEST_RESET_EPOCH <= reset <= self.clock() + MAX_RESET_AHEAD_S:
                self.reset_epoch = float(int(reset))
            else:  # the last plausible reset (if any) stays
                logger.warning(
                    "Pexels sent X-Ratelimit-Reset %s, not a plausible UNIX time in seconds; ignored", reset
                )
        if remaining is not None and remaining <= 0:
            self.block("remaining reached 0")

    def block(self, reason: str, retry_after_s: float | None = None) -> float:
        """Stop calling: for retry_after_s when the answer gave one; until the reset when the period's calls are
        spent (Remaining 0); else for the default backoff, or until the reset if that comes sooner.

        Pexels' X-Ratelimit-Reset is the monthly period's, while a 429 without Remaining 0 is its hourly
        limit: blocking until the reset then switched stock photos off for weeks after one busy hour."""
        now = self.clock()
        reset_ahead = self.reset_epoch if self.reset_epoch is not None and self.reset_epoch > now else None
        if retry_after_s is not None:
            until = now + retry_after_s
        elif reset_ahead is not None and self.remaining is not None and self.remaining <= 0:
            until = reset_ahead
        else:
            until = min(now + self.default_block_s, reset_ahead or math.inf)
        # Remaining stays what Pexels last said: it counts the monthly period, and an hourly 429 leaves most of
        # it (health and the metric showed 0 left after one busy hour). Blocked is said by blocked_until.
        self.blocked_until, self.blocked_reason = until, reason
        logger.warning("Pexels quota: %s; no calls until %s", reason, _iso(until))
        return until

    def snapshot(self) -> QuotaSnapshot:
        """The quota for health and metrics. Never raises: the job worker, /health and /metrics all call it."""
        blocked = self.blocked_until is not None and self.clock() < self.blocked_until
        block_passed = self.blocked_until is not None and not blocked
        return QuotaSnapshot(
            limit=self.limit,
            # A block's remaining=0 is stale once its time has passed: unknown until the next answer says
            # (check() clears it the same way, but only when the next call comes).
            remaining=None if block_passed else self.remaining,
            reset_at=_as_datetime(self.reset_epoch),
            blocked_until=_as_datetime(self.blocked_until) if blocked else None,
            blocked_reason=self.blocked_reason if blocked else None,
        )


# --- the client --------------------------------------------------------------------------------------------


class PexelsClient:
    """Search and get photos. One instance per process: it holds the quota state and a connection pool."""

    def __init__(
        self,
        api_key: SecretStr | str | None,
        *,
        base_url: str = "https://api.pexels.com/v1",
        timeout_s: float = 10.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        quota_backoff_s: float = 900.0,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key or ""
        # A key read from a secret file (Docker, Kubernetes) often ends in a newline; no Pexels key has
        # whitespace around it, and sent in a header it would make every request fail.
        key = key.strip()
        self._key = SecretStr(key) if key else None
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.quota = QuotaTracker(default_block_s=quota_backoff_s, clock=clock)
        self._sleep = sleep
        self._owns_http = http is None
        self.timeout_s = timeout_s
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=False)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, http: httpx.AsyncClient | None = None, **overrides: Any
    ) -> PexelsClient:
        kwargs: dict[str, Any] = {
            "base_url": settings.pexels_api_base_url,
            "timeout_s": settings.pexels_timeout_s,
            "max_retries": settings.pexels_max_retries,
            "backoff_s": settings.pexels_retry_backoff_s,
            "quota_backoff_s": settings.pexels_quota_backoff_s,
            "http": http,
        }
        kwargs.update(overrides)
        return cls(settings.pexels_api_key, **kwargs)

    @property
    def configured(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:
        # Spelled out so that no future field can put the key in a log line or a traceback.
        return f"PexelsClient(base_url={self.base_url!r}, configured={self.configured})"

    async def __aenter__(self) -> PexelsClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def search(
        self,
        query: str,
        *,
        orientation: Orientation | None = None,
        size: PhotoSize | None = None,
        color: str | None = None,
        locale: str | None = None,
        page: int = 1,
        per_page: int = 15,
    ) -> PexelsSearchPage:
        """GET /search. `color` is a Pexels colour name (red, ..., white) or a hex code like '#ffffff'."""
        query = query.strip()
        if not query:
            raise ValueError("query must contain text, got only whitespace")
        if not 1 <= per_page <= MAX_PER_PAGE:
            raise ValueError(f"per_page must be between 1 and {MAX_PER_PAGE}, got {per_page}")
        if page < 1:
            raise ValueError(f"page must be 1 or more, got {page}")
        params: dict[str, str | int] = {"query": query, "page": page, "per_page": per_page}
        if orientation:
            params["orientation"] = orientation.value
        if size:
            params["size"] = size.value
        if color:
            # A colour name or a hex code such as "#ffffff"; httpx percent-encodes the '#'.
            params["color"] = color
        if locale:
            params["locale"] = locale
        data = await self._get_json("/search", params)
        return self._parse(PexelsSearchPage, self._valid_photos_only(data), "search")

    async def get_photo(self, photo_id: int) -> PexelsPhoto:
        """GET /photos/:id."""
        data = await self._get_json(f"/photos/{int(photo_id)}", {})
        return self._parse(PexelsPhoto, data, "photo")

    # --- internals ---

    @staticmethod
    def _valid_photos_only(data: Any) -> Any:
        """The search answer with the photos that do not parse left out (logged), as long as one does: a photo
        Pexels describes oddly (a null photographer, a zero width) costs that photo, not the nine good ones
        beside it. With none left, the answer goes through as it came and fails on its first bad photo."""
        photos = data.get("photos") if isinstance(data, dict) else None
        if not isinstance(photos, list) or not photos:
            return data
        kept: list[PexelsPhoto] = []
        first_problem = ""
        for index, photo in enumerate(photos):
            try:
                kept.append(PexelsPhoto.model_validate(photo))
            except ValidationError as error:
                if not first_problem:
                    problem = error.errors()[0]
                    where = ".".join(str(part) for part in problem["loc"])
                    first_problem = f"photos.{index}" + (f".{where}" if where else "") + f": {problem['msg']}"
        if not kept or len(kept) == len(photos):
            return data
        logger.warning(
            "Pexels search answer: %d of %d photos left out, their fields not as the API documents (first: %s)",
            len(photos) - len(kept),
            len(photos),
            first_problem,
        )
        return {**data, "photos": kept}

    def _parse(self, model: type[_M], data: Any, what: str) -> _M:
        try:
            return model.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or what
            raise PexelsBadResponse(
                f"Pexels {what} answer has an unexpected shape at {where}: {first['msg']}"
            ) from None

    def _calling(self, path: str) -> str:
        """What a network failure was doing, with the host: a user with IMAGESMITH_PEXELS_API_BASE_URL set (a
        proxy, a stand-in) needs to see which one did not answer."""
        parts = urlsplit(self.base_url)
        # Host and port only: a proxy's user and password in the URL must not reach a job's error detail.
        host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
        return f"calling Pexels {path} at {host or 'the configured base URL'}"

    async def _get_json(self, path: str, params: Mapping[str, str | int]) -> Any:
        if self._key is None:
            raise PexelsNotConfigured("no Pexels API key: set IMAGESMITH_PEXELS_API_KEY")
        self.quota.check()  # raises PexelsQuotaExhausted while a 429 or an empty quota blocks
        url = self.base_url + path
        headers = {"Authorization": self._key.get_secret_value(), "Accept": "application/json"}

        async def get_capped() -> tuple[httpx.Response, bytes]:
            # Streamed with a cap on the decoded bytes: a 300 KB gzipped answer took the server's memory from
            # 1.3 to 2.2 GB when read whole (an 80-photo page is about 100 KB).
            async with self._http.stream("GET", url, params=params, headers=headers) as response:
                body = await read_at_most(response, MAX_API_BODY_BYTES)
            if body is None:
                raise PexelsBadResponse(f"Pexels {path} answered more than {MAX_API_BODY_BYTES} bytes")
            return response, body

        async def once() -> tuple[httpx.Response, bytes]:
            try:
                response, body = await within_deadline(get_capped, self.timeout_s, self._calling(path))
            except (
                httpx.LocalProtocolError,
                httpx.UnsupportedProtocol,
                httpx.InvalidURL,
                UnicodeEncodeError,
            ) as error:
                # The request cannot even be sent, and never will be: a control or non-ASCII character in the
                # key (not allowed in a header) or a base URL without http(s)://. The error's own text is left
                # out: h11 quotes the illegal header value, which is the key.
                raise PexelsNotConfigured(
                    f"the Pexels request cannot be sent ({type(error).__name__}): check that "
                    "IMAGESMITH_PEXELS_API_KEY is the bare key (no line breaks, spaces or non-ASCII characters "
                    "inside) and IMAGESMITH_PEXELS_API_BASE_URL starts with https://"
                ) from None
            except httpx.DecodingError:  # a body that does not match its Content-Encoding
                raise PexelsBadResponse(f"Pexels {path} answered with a body that does not decode") from None
            except httpx.TransportError as error:  # a proxy error: nothing says a retry would pass
                raise PexelsUnavailable(f"{type(error).__name__} {self._calling(path)}") from None
            self.quota.observe(response.headers)
            if is_retryable_status(response.status_code):
                raise Retryable(f"Pexels {path} answered {response.status_code}")
            return response, body

        # Raises PexelsUnavailable once the retries are spent.
        response, body = await with_retries(
            once, max_retries=self.max_retries, backoff_s=self.backoff_s, sleep=self._sleep
        )
        return self._decode(response, body, path)

    def _decode(self, response: httpx.Response, body: bytes, path: str) -> Any:
        status = response.status_code
        if status == 429:
            retry_after = _retry_after_s(response.headers, self.quota.clock())
            until = self.quota.block("429 Too Many Requests", retry_after)
            raise PexelsQuotaExhausted.at_epoch(until)
        if status in (401, 403):
            raise PexelsAuthError(f"Pexels refused the API key ({status}); check IMAGESMITH_PEXELS_API_KEY")
        if status == 404:
            if not path.startswith("/photos/"):
                # Pexels' search always exists: a 404 there means the API root is wrong, which no retry or
                # later request changes, so it is a setting to fix (and `doctor` counts it as a fault).
                raise PexelsNotConfigured(
                    f"Pexels has nothing at {self.base_url}{path} (404): IMAGESMITH_PEXELS_API_BASE_URL must be "
                    "Pexels' API root, https://api.pexels.com/v1, or a proxy that answers like it"
                )
            raise PexelsNotFound(f"Pexels has nothing at {path} (404)")
        if status != 200:
            raise PexelsBadResponse(f"Pexels {path} answered {status}")
        try:
            data = json.loads(body)
        except ValueError:
            raise PexelsBadResponse(f"Pexels {path} answered 200 with malformed JSON") from None
        return data


def _retry_after_s(headers: Mapping[str, str], now: float) -> float | None:
    """Retry-After in seconds, when a 429 happens to carry one (Pexels' usually carries nothing): a number of
    seconds or an HTTP-date (RFC 9110 allows both; proxies and CDNs send dates). At most a day, since a longer
    wait is more likely a proxy's mistake than Pexels' wish."""
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    seconds = _finite_number(raw)
    if seconds is None:
        seconds = _http_date_in_s(raw, now)
    if seconds is not None and seconds > MAX_RETRY_AFTER_S:
        logger.warning("Pexels sent Retry-After %s s; waiting %d s at most", seconds, MAX_RETRY_AFTER_S)
        return MAX_RETRY_AFTER_S
    return None if seconds is None else max(0.0, seconds)


def _http_date_in_s(raw: str, now: float) -> float | None:
    """Seconds from now until an HTTP-date ("Wed, 21 Oct 2026 07:28:00 GMT"); None, with a warning, when it is
    not one."""
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        logger.warning(
            "Pexels sent Retry-After %r, neither a number of seconds nor an HTTP-date; ignored", raw[:40]
        )
        return None
    if when.tzinfo is None:  # RFC 9110's dates are GMT; a date without a zone is read as such
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now
