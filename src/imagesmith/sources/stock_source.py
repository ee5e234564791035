"""Pexels stock photos behind the source protocol, for the (synchronous) job worker.

StockPhotoSource (stock.py) is async: one httpx client pool, the quota state and the search cache. The worker
thread is synchronous, so this source owns a private event loop on a thread of its own, builds one
StockPhotoSource on it at start-up and keeps it for the life of the process: the quota block, the 24-hour
cache and the no-repeat memory persist across jobs. The worker's calls are handed to that loop and waited for,
checking the job's cancel token as they wait. close() (the app's lifespan, at shutdown) closes the clients and
stops the loop.

Every failure becomes SourceUnavailable / NoMatch with a FallbackReason (see fallback.py), so the worker can
pass to generation when the request allows it, and say why.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from imagesmith.config import Settings
from imagesmith.engine.progress import CancelToken, GenerationCanceled, ProgressCallback
from imagesmith.sources.base import (
    FallbackReason,
    ImageRequest,
    NoMatch,
    SourceImage,
    SourceName,
    SourceResult,
    SourceState,
    SourceStatus,
    SourceUnavailable,
)
from imagesmith.sources.errors import NothingToSearch, PexelsError, PexelsQuotaExhausted
from imagesmith.sources.fallback import classify
from imagesmith.sources.stock import StockPhotoSource, StockRequest

log = logging.getLogger(__name__)

_T = TypeVar("_T")
WAIT_SLICE_S = 0.1  # how often a waiting fetch looks at the cancel token
CLOSE_TIMEOUT_S = 10.0


def stock_request(request: ImageRequest) -> StockRequest:
    """What the stock search needs from a job: the texts to build the query from, the exact size and format."""
    resolved = request.generation.resolve()
    return StockRequest(
        prompt=request.generation.prompt,
        title=request.title,
        keywords=request.keywords or None,
        width=resolved.width,
        height=resolved.height,
        output_format=resolved.output_format,
    )


class StockSource:
    """One per process. Serves one photo per job (num_images is a generation option)."""

    name = SourceName.STOCK

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="imagesmith-pexels", daemon=True)
        self._thread.start()
        self._closed = False
        # Why Pexels cannot serve until a setting changes (a refused key, an API root with no search), or None.
        self._setting_failure: str | None = None
        self._errors: Counter[str] = Counter()

        async def build() -> StockPhotoSource:  # on the loop, so the httpx clients belong to it
            return StockPhotoSource.from_settings(settings, clock=clock)

        try:
            self.photos = self._run(build())
        except BaseException:  # bad settings (an allowed host that is not a host): leave no thread behind
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_TIMEOUT_S)
            raise

    def _run(self, coro: Coroutine[Any, Any, _T], cancel: CancelToken | None = None) -> _T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        while True:
            try:
                return future.result(timeout=WAIT_SLICE_S)
            except TimeoutError:
                if cancel is not None and cancel.canceled:
                    future.cancel()
                    raise GenerationCanceled("stock photo fetch canceled") from None

    def fetch(
        self,
        request: ImageRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> SourceResult:
        if self._closed:
            raise SourceUnavailable("the stock source is shut down")
        try:
            photo = self._run(self.photos.fetch(stock_request(request)), cancel)
        except GenerationCanceled:
            raise
        except PexelsError as error:
            reason = classify(error)
            self._errors[reason.value] += 1
            if reason is FallbackReason.AUTH_FAILED:
                self._setting_failure = "Pexels refused the API key; check IMAGESMITH_PEXELS_API_KEY"
            elif reason is FallbackReason.NOT_CONFIGURED:
                self._setting_failure = str(error)
            elif reason is FallbackReason.NO_RESULTS and not isinstance(error, NothingToSearch):
                self._setting_failure = None  # Pexels answered a search: the key and the address work
            # A quota or network error says nothing about the key: a refused key stays reported.
            retry_at = error.retry_at if isinstance(error, PexelsQuotaExhausted) else None
            kind = NoMatch if reason is FallbackReason.NO_RESULTS else SourceUnavailable
            raise kind(str(error), reason, retry_at) from error
        except Exception as error:  # a bug on the stock path must not fail a job that may generate instead
            log.exception("stock source failed unexpectedly")
            self._errors[FallbackReason.ERROR.value] += 1
            raise SourceUnavailable(f"{type(error).__name__}: {error}", FallbackReason.ERROR) from error
        self._setting_failure = None
        image = SourceImage(
            data=photo.data, media_type=photo.media_type, width=photo.width, height=photo.height
        )
        return SourceResult(
            source=self.name,
            images=[image],
            metadata={"provider": "pexels", **photo.model_dump(mode="json")},
            attribution=photo.attribution.model_dump(mode="json"),
        )

    def status(self) -> SourceStatus:
        report = self.photos.status()
        info = {**report.model_dump(mode="json"), "errors": dict(self._errors)}
        quota = report.quota
        if not report.configured:
            return SourceStatus(SourceState.NOT_CONFIGURED, "no Pexels API key", info)
        if quota.blocked_until is not None:
            detail = (
                f"Pexels quota exhausted ({quota.blocked_reason}); calls resume at "
                f"{quota.blocked_until.isoformat()} (cached searches still serve)"
            )
            return SourceStatus(SourceState.BLOCKED, detail, info)
        if self._setting_failure is not None:
            return SourceStatus(SourceState.FAILED, self._setting_failure, info)
        left = "" if quota.remaining is None else f"; {quota.remaining} of {quota.limit} requests left"
        return SourceStatus(SourceState.READY, "Pexels configured" + left, info)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.photos.aclose(), self._loop).result(CLOSE_TIMEOUT_S)
        except Exception:
            log.warning("closing the Pexels clients failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()


def create_stock_source(settings: Settings) -> StockSource | None:
    """The stock source when a Pexels key is configured; None otherwise (stock is then "not configured")."""
    if settings.pexels_api_key is None:
        return None
    return StockSource(settings)
