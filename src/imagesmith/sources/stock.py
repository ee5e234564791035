"""Pexels as an image source: from a request (prompt, title, keywords, size) to a file with its credit inside.

    source = StockPhotoSource.from_settings(get_settings())      # once, in the service's lifespan
    photo = await source.fetch(StockRequest(prompt=..., title=..., keywords=[...], width=1216, height=832))
    photo.data            # JPEG bytes, exactly width x height, attribution embedded (see attribution.py)
    photo.attribution     # photographer, links, alt, avg_color, credit_text / credit_html
    source.status()       # for /health and /metrics: configured, quota, blocked_until, last_error, counters
    await source.aclose() # at shutdown

How a photo is chosen:
- the query is the keywords, else the title, else the prompt's first clause (see build_query);
- the orientation filter follows the requested size (landscape for the default blog hero, 1216x832);
- results are cached in memory for pexels_cache_ttl_s (24 h) per normalised query and filters: a restart
  forgets them, which costs one API call per query, and several workers each keep their own;
- candidates are ranked by aspect closeness (in 10% steps), then by whether they cover the size without
  upscaling, then by Pexels' own relevance order;
- the photo handed out last time for the same query and filters is not handed out again when another exists;
- the download asks Pexels' image CDN for the exact crop (src.original + w/h/fit=crop), then checks and
  fits it locally, so the result is exactly width x height whatever the CDN did.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imagesmith.schemas import ASPECT_SIZES, MAX_SIDE, MIN_SIDE, AspectPreset, OutputFormat
from imagesmith.sources.attribution import Attribution, encode_with_attribution
from imagesmith.sources.download import HostPolicy, ImageDownloader, fit_exact
from imagesmith.sources.errors import (
    DownloadRejected,
    NoStockResults,
    NotAnImage,
    NothingToSearch,
    PexelsBadResponse,
    PexelsError,
)
from imagesmith.sources.pexels_client import (
    Orientation,
    PexelsClient,
    PexelsPhoto,
    PexelsSearchPage,
    PhotoSize,
    QuotaSnapshot,
)
from imagesmith.sources.pexels_locale import checked_locale

if TYPE_CHECKING:
    from imagesmith.config import Settings

logger = logging.getLogger(__name__)

DEFAULT_SIZE = ASPECT_SIZES[AspectPreset.LANDSCAPE]  # 1216x832, about 3:2: a classic blog hero
MAX_QUERY_CHARS = 80
MAX_KEYWORDS = 6
ASPECT_STEP = 0.1  # log-aspect step within which Pexels' relevance order wins over a closer aspect
SQUARE_TOLERANCE = 1.15  # width/height within this factor of 1 asks for square photos
MAX_DOWNLOAD_CANDIDATES = 3


# What Pexels' /search takes as `color` (its API documentation): these names, or a hexadecimal colour code.
PEXELS_COLORS = (
    "red", "orange", "yellow", "green", "turquoise", "blue", "violet", "pink", "brown", "black", "gray", "white",
)  # fmt: skip
_HEX_COLOR = re.compile(r"#(?:[0-9a-f]{3}|[0-9a-f]{6})")


class StockRequest(BaseModel):
    """What the stock source needs from an image request; the service builds it from its own request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = ""
    title: str | None = None
    keywords: list[str] | None = None
    width: int = Field(DEFAULT_SIZE[0], ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(DEFAULT_SIZE[1], ge=MIN_SIDE, le=MAX_SIDE)
    color: str | None = Field(None, description="Pexels colour name or hex code, e.g. 'blue' or '#ffaa00'.")
    locale: str | None = Field(None, description="Search locale, e.g. 'de-DE'; default: the setting.")
    size: PhotoSize | None = Field(None, description="Pexels' minimum photo size filter.")
    output_format: OutputFormat = OutputFormat.JPEG

    @field_validator("keywords")
    @classmethod
    def _drop_blank_keywords(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [k.strip() for k in value if k and k.strip()]

    # Checked here, before a search is spent: Pexels refuses others with a 400 that said neither the option nor
    # the fix (exit 3, "Pexels /search answered 400").
    @field_validator("color")
    @classmethod
    def _pexels_color(cls, value: str | None) -> str | None:
        if value is None:
            return None
        named = value.strip().lower()
        if named in PEXELS_COLORS or _HEX_COLOR.fullmatch(named):
            return named
        raise ValueError(
            f"{value!r} is not a colour Pexels searches by: use one of {', '.join(PEXELS_COLORS)}, or a hex code "
            "such as '#ffaa00'"
        )

    @field_validator("locale")
    @classmethod
    def _locale_shape(cls, value: str | None) -> str | None:
        return None if value is None else checked_locale(value)

    def query(self) -> str:
        return build_query(self.prompt, self.title, self.keywords)


class StockPhoto(BaseModel):
    """A stock photo ready to store: the file's bytes and everything the API and job result report."""

    model_config = ConfigDict(frozen=True)

    data: bytes = Field(exclude=True, repr=False)
    media_type: str
    output_format: OutputFormat
    width: int
    height: int
    attribution: Attribution
    query: str
    orientation: Orientation
    photo_id: int
    download_url: str
    original_width: int
    original_height: int
    search_cached: bool


class StockSearch(BaseModel):
    """A search as the source sees it: the ranked candidates for one request."""

    query: str
    orientation: Orientation
    total_results: int
    photos: list[PexelsPhoto]  # ranked best first
    from_cache: bool


class PexelsStatus(BaseModel):
    """Health and metrics of the stock source."""

    configured: bool
    base_url: str
    quota: QuotaSnapshot
    blocked: bool
    last_error: str | None
    cache_entries: int
    api_searches: int
    cache_hits: int
    photos_served: int
    failures: int


# --- pure helpers ------------------------------------------------------------------------------------------

_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?")  # A1111 prompt weights like "(cabin:1.2)"
_BRACKETS = re.compile(r"[()\[\]{}<>]")
_SPACES = re.compile(r"\s+")


def build_query(prompt: str, title: str | None = None, keywords: Sequence[str] | None = None) -> str:
    """Keywords (up to six, deduplicated), else the title, else the prompt's first clause.

    Prompts for SDXL trail style words ("8k, highly detailed, golden hour") that drown a photo search, so only
    the part before the first comma is used when it has some substance.
    """
    words = [k.strip() for k in keywords or () if k and k.strip()]
    if words:
        seen: set[str] = set()
        unique = [w for w in words if not (w.casefold() in seen or seen.add(w.casefold()))]  # type: ignore[func-returns-value]
        text = " ".join(unique[:MAX_KEYWORDS])
    elif title and title.strip():
        text = title
    else:
        text = _BRACKETS.sub(" ", _WEIGHT.sub("", prompt))
        first = text.split(",")[0]
        if len(first.split()) >= 2:
            text = first
    text = _SPACES.sub(" ", text).strip()
    if len(text) > MAX_QUERY_CHARS:
        text = text[:MAX_QUERY_CHARS].rsplit(" ", 1)[0]
    # Words, not punctuation: "(((((" came out empty and was refused, while ",,,," went to Pexels as a query.
    if not any(character.isalnum() for character in text):
        raise ValueError(
            "a stock photo search needs keywords, a title or a prompt with words in it; none has any"
        )
    return text


def normalise_query(query: str) -> str:
    """The cache's and the repeat memory's view of a query: case, spacing and edge punctuation ignored (but a
    query of punctuation alone stays itself: "!!!", "???" and "..." all became "" and shared one entry)."""
    spaced = _SPACES.sub(" ", query.casefold())
    return spaced.strip(" .,;:!?\"'") or spaced.strip()


def orientation_for(width: int, height: int) -> Orientation:
    ratio = width / height
    if ratio >= SQUARE_TOLERANCE:
        return Orientation.LANDSCAPE
    if ratio <= 1 / SQUARE_TOLERANCE:
        return Orientation.PORTRAIT
    return Orientation.SQUARE


def rank_photos(photos: Sequence[PexelsPhoto], width: int, height: int) -> list[PexelsPhoto]:
    """Best first: aspect closeness (in ASPECT_STEP steps), then covering the size, then Pexels' relevance."""
    target = math.log(width / height)

    def key(indexed: tuple[int, PexelsPhoto]) -> tuple[int, bool, int]:
        relevance, photo = indexed
        aspect_step = round(abs(math.log(photo.width / photo.height) - target) / ASPECT_STEP)
        covers = photo.width >= width and photo.height >= height
        return aspect_step, not covers, relevance

    return [photo for _, photo in sorted(enumerate(photos), key=key)]


def variant_url(photo: PexelsPhoto, width: int, height: int) -> str:
    """The URL to download: the CDN's exact crop when the photo is big enough, else the original.

    Pexels' src.original accepts imgix parameters; asking it for w/h/fit=crop saves downloading a 24 MP
    original to throw most of it away. A photo smaller than the request comes whole, to be upscaled here.
    """
    original = photo.src.original
    if photo.width < width or photo.height < height:
        return original
    parts = urlsplit(original)
    query = urlencode({"auto": "compress", "cs": "tinysrgb", "fit": "crop", "w": width, "h": height})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


class SearchCache:
    """Search pages by key for ttl_s seconds, at most max_entries (oldest use goes first); in memory."""

    def __init__(
        self, ttl_s: float, max_entries: int = 512, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[Any, ...], tuple[float, PexelsSearchPage]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[Any, ...]) -> PexelsSearchPage | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, page = entry
        if self._clock() - stored_at >= self.ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return page

    def put(self, key: tuple[Any, ...], page: PexelsSearchPage) -> None:
        if self.ttl_s <= 0:
            return
        self._entries[key] = (self._clock(), page)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


# --- the source --------------------------------------------------------------------------------------------


class StockPhotoSource:
    def __init__(
        self,
        client: PexelsClient,
        downloader: ImageDownloader,
        *,
        cache: SearchCache | None = None,
        per_page: int = 30,
        locale: str = "",
    ) -> None:
        self.client = client
        self.downloader = downloader
        self.cache = cache if cache is not None else SearchCache(ttl_s=86_400.0)
        self.per_page = per_page
        self.locale = locale
        self._last_served: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self._last_error: str | None = None
        self._counters = {"api_searches": 0, "cache_hits": 0, "photos_served": 0, "failures": 0}

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> StockPhotoSource:
        """Build from settings. `clock` (UNIX seconds) drives quota and cache expiry; tests pass a fake.
        Raises ValueError for an allowed host that is not a host, before any connection pool is opened."""
        policy = HostPolicy(settings.pexels_allowed_hosts)
        client = PexelsClient.from_settings(settings, clock=clock)
        downloader = ImageDownloader(
            policy,
            max_bytes=settings.pexels_max_download_bytes,
            max_pixels=settings.pexels_max_image_pixels,
            max_image_bytes=settings.pexels_max_image_bytes,
            timeout_s=settings.pexels_download_timeout_s,
            max_retries=settings.pexels_max_retries,
            backoff_s=settings.pexels_retry_backoff_s,
        )
        return cls(
            client,
            downloader,
            cache=SearchCache(ttl_s=settings.pexels_cache_ttl_s, clock=clock),
            per_page=settings.pexels_per_page,
            locale=settings.pexels_locale,
        )

    @property
    def configured(self) -> bool:
        return self.client.configured

    async def __aenter__(self) -> StockPhotoSource:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.downloader.aclose()

    def _key(self, request: StockRequest, query: str, orientation: Orientation) -> tuple[Any, ...]:
        return (
            normalise_query(query),
            orientation.value,
            request.size.value if request.size else "",
            (request.color or "").casefold(),
            request.locale or self.locale,
            self.per_page,
        )

    async def search(self, request: StockRequest) -> StockSearch:
        """The ranked candidates for a request (from the cache when fresh). Raises PexelsError subclasses."""
        try:
            query = request.query()
        except ValueError as error:
            # A request, not a bug: "no photo for this", so the next source may serve it.
            message = f"nothing to search Pexels for in prompt {request.prompt[:80]!r}: {error}"
            raise NothingToSearch("", message) from None
        orientation = orientation_for(request.width, request.height)
        key = self._key(request, query, orientation)
        page = self.cache.get(key)
        from_cache = page is not None
        if page is None:
            try:
                page = await self.client.search(
                    query,
                    orientation=orientation,
                    size=request.size,
                    color=request.color,
                    locale=request.locale or self.locale or None,
                    per_page=self.per_page,
                )
            except PexelsError as error:
                self._counters["failures"] += 1
                self._last_error = f"{type(error).__name__}: {error}"
                raise
            self._last_error = None  # Pexels answered: an earlier failure is over
            self._counters["api_searches"] += 1
            self.cache.put(key, page)
        else:
            self._counters["cache_hits"] += 1
        ranked = rank_photos(page.photos, request.width, request.height)
        logger.info(
            "Pexels search %r (%s): %d photos%s",
            query,
            orientation.value,
            len(ranked),
            " (cached)" if from_cache else "",
        )
        return StockSearch(
            query=query,
            orientation=orientation,
            total_results=page.total_results,
            photos=ranked,
            from_cache=from_cache,
        )

    async def fetch(self, request: StockRequest, found: StockSearch | None = None) -> StockPhoto:
        """The best photo for the request, downloaded, fitted to width x height, attribution embedded.
        `found`: this request's search when the caller has already made it (it is not made again).

        Raises NoStockResults when nothing fits, and the client's errors (PexelsNotConfigured,
        PexelsAuthError, PexelsQuotaExhausted, PexelsUnavailable, PexelsBadResponse) as they come.
        """
        try:
            return await self._fetch(request, found or await self.search(request))
        except PexelsError as error:
            self._last_error = f"{type(error).__name__}: {error}"
            raise

    async def _fetch(self, request: StockRequest, found: StockSearch) -> StockPhoto:
        key = self._key(request, found.query, found.orientation)
        candidates = self._avoid_repeat(found.photos, self._last_served.get(key))
        if not candidates:
            raise NoStockResults(found.query)
        last_problem: PexelsError | None = None
        for photo in candidates[:MAX_DOWNLOAD_CANDIDATES]:
            try:
                result = await self._download(photo, request, found)
            except (DownloadRejected, PexelsBadResponse) as error:
                # A bad file from one photo says nothing about the next: try it.
                logger.warning("Pexels photo %d skipped: %s", photo.id, error)
                last_problem = error
                self._counters["failures"] += 1
                continue
            self._remember(key, photo.id)
            self._counters["photos_served"] += 1
            self._last_error = None
            return result
        raise NoStockResults(
            found.query, f"no Pexels photo for {found.query!r} could be downloaded: {last_problem}"
        )

    @staticmethod
    def _avoid_repeat(photos: list[PexelsPhoto], last_id: int | None) -> list[PexelsPhoto]:
        if last_id is None or len(photos) < 2 or photos[0].id != last_id:
            return photos
        return [*photos[1:], photos[0]]

    def _remember(self, key: tuple[Any, ...], photo_id: int) -> None:
        self._last_served[key] = photo_id
        self._last_served.move_to_end(key)
        while len(self._last_served) > self.cache.max_entries:
            self._last_served.popitem(last=False)

    async def _download(self, photo: PexelsPhoto, request: StockRequest, found: StockSearch) -> StockPhoto:
        url = variant_url(photo, request.width, request.height)
        downloaded = await self.downloader.fetch(url)
        check_not_a_placeholder(downloaded.image.size, photo, request)
        fitted = fit_exact(downloaded.image, request.width, request.height)
        attribution = Attribution.from_photo(photo)
        data = encode_with_attribution(fitted, request.output_format, attribution)
        logger.info(
            "Pexels photo %d by %s served for %r at %dx%d",
            photo.id,
            attribution.photographer,
            found.query,
            request.width,
            request.height,
        )
        return StockPhoto(
            data=data,
            media_type=request.output_format.media_type,
            output_format=request.output_format,
            width=request.width,
            height=request.height,
            attribution=attribution,
            query=found.query,
            orientation=found.orientation,
            photo_id=photo.id,
            download_url=downloaded.url,
            original_width=photo.width,
            original_height=photo.height,
            search_cached=found.from_cache,
        )

    def status(self) -> PexelsStatus:
        quota = self.client.quota.snapshot()
        return PexelsStatus(
            configured=self.configured,
            base_url=self.client.base_url,
            quota=quota,
            blocked=quota.blocked_until is not None,
            last_error=self._last_error,
            cache_entries=len(self.cache),
            **self._counters,
        )


PLACEHOLDER_FRACTION = 4  # a download this many times smaller than expected, on either side, is not the photo


def check_not_a_placeholder(size: tuple[int, int], photo: PexelsPhoto, request: StockRequest) -> None:
    """Refuse a download far smaller than the crop asked for (or the photo itself, if smaller): a CDN's 1x1
    placeholder was upscaled and served as a flat "photo" with full credit; refused, the next candidate is
    tried."""
    width, height = size
    expected_width, expected_height = min(photo.width, request.width), min(photo.height, request.height)
    if width * PLACEHOLDER_FRACTION < expected_width or height * PLACEHOLDER_FRACTION < expected_height:
        raise NotAnImage(
            f"photo {photo.id} downloaded at {width}x{height}, far below the {expected_width}x{expected_height} "
            "asked for (a placeholder?)"
        )
