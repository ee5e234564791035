"""Which source serves a request, in which order, and why: the one policy the job worker calls.

    served = serve_first(request, registry.get, on_progress=..., cancel=...)
    served.result       # the SourceResult of the source that served
    served.source       # SourceName.STOCK or SourceName.GENERATE
    served.reason       # FallbackReason.REQUESTED when the first choice served, else why it was passed over
    served.summary      # one line for the response: "stock: quota_exhausted (Pexels quota ...; calls resume at ...)"
    served.attempts     # every source tried, with its outcome, reason and retry time: the job result keeps them

The request's `sources` is the order (the seed's flags make it: use_pexels -> stock, use_generation ->
generate, both -> stock first, since a real photo costs no GPU time). A source passes to the next by raising
SourceUnavailable (or NoMatch) with a FallbackReason; when none serves, SourcesExhausted carries every attempt.
Anything else a source raises (a generation's CUDA out-of-memory, a cancel) fails the job as it is. The stock
source turns every Pexels error into a reason with `classify`, and even an unexpected bug into
FallbackReason.ERROR, so a problem on the stock path never blocks a generation the user allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel

from imagesmith.sources.base import (
    FallbackReason,
    ImageRequest,
    ImageSource,
    SourceName,
    SourceResult,
    SourceUnavailable,
)
from imagesmith.sources.errors import (
    DownloadRejected,
    NoStockResults,
    PexelsAuthError,
    PexelsBadResponse,
    PexelsNotConfigured,
    PexelsQuotaExhausted,
    PexelsUnavailable,
)

if TYPE_CHECKING:  # the engine package imports torch: keep it out of light imports
    from imagesmith.engine.progress import CancelToken, ProgressCallback

logger = logging.getLogger(__name__)

SourceLookup = Callable[[SourceName], ImageSource | None]


class SourceAttempt(BaseModel):
    source: SourceName
    served: bool
    reason: FallbackReason
    detail: str = ""  # the error's message, for people; never contains a key
    retry_at: datetime | None = None  # when the source may serve again (a quota reset), where known

    def describe(self) -> str:
        return f"{self.source.value}: {self.reason.value}" + (f" ({self.detail})" if self.detail else "")


def classify(error: BaseException) -> FallbackReason:
    """The reason a stock fetch failed, from the Pexels error's type."""
    if isinstance(error, NoStockResults | DownloadRejected):
        return FallbackReason.NO_RESULTS
    if isinstance(error, PexelsQuotaExhausted):
        return FallbackReason.QUOTA_EXHAUSTED
    if isinstance(error, PexelsNotConfigured):
        return FallbackReason.NOT_CONFIGURED
    if isinstance(error, PexelsAuthError):
        return FallbackReason.AUTH_FAILED
    if isinstance(error, PexelsUnavailable):
        return FallbackReason.UNAVAILABLE
    if isinstance(error, PexelsBadResponse):
        return FallbackReason.BAD_RESPONSE
    return FallbackReason.ERROR


@dataclass
class Served:
    result: SourceResult
    attempts: list[SourceAttempt] = field(default_factory=list)

    @property
    def source(self) -> SourceName:
        return self.result.source

    @property
    def passed(self) -> list[SourceAttempt]:
        return [attempt for attempt in self.attempts if not attempt.served]

    @property
    def reason(self) -> FallbackReason:
        """REQUESTED when the first choice served; else why the source before the one that served passed."""
        passed = self.passed
        return passed[-1].reason if passed else FallbackReason.REQUESTED

    @property
    def summary(self) -> str:
        """Why this source served, in one line: 'requested', or each passed source with its reason."""
        passed = self.passed
        return (
            "; ".join(attempt.describe() for attempt in passed) if passed else FallbackReason.REQUESTED.value
        )


class SourcesExhausted(SourceUnavailable):
    """No allowed source could serve; `attempts` says why for each, `reason` is the last one's."""

    def __init__(self, attempts: list[SourceAttempt]) -> None:
        self.attempts = attempts
        details = "; ".join(attempt.describe() for attempt in attempts)
        retry = [attempt.retry_at for attempt in attempts if attempt.retry_at is not None]
        super().__init__(
            f"no source could serve the image: {details}",
            attempts[-1].reason if attempts else FallbackReason.NOT_CONFIGURED,
            min(retry) if retry else None,
        )

    @property
    def reasons(self) -> list[FallbackReason]:
        return [attempt.reason for attempt in self.attempts]


def serve_first(
    request: ImageRequest,
    lookup: SourceLookup,
    on_progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Served:
    """Try the request's sources in order; return the first result with the story of how it was reached."""
    attempts: list[SourceAttempt] = []
    for name in request.sources:
        source = lookup(name)
        if source is None:
            attempts.append(
                SourceAttempt(
                    source=name,
                    served=False,
                    reason=FallbackReason.NOT_CONFIGURED,
                    detail=f"no {name.value} source is configured",
                )
            )
            continue
        try:
            result = source.fetch(request, on_progress=on_progress, cancel=cancel)
        except SourceUnavailable as error:
            logger.info("source %s passed over (%s): %s", name.value, error.reason.value, error)
            attempts.append(
                SourceAttempt(
                    source=name, served=False, reason=error.reason, detail=str(error), retry_at=error.retry_at
                )
            )
            continue
        attempts.append(SourceAttempt(source=name, served=True, reason=FallbackReason.REQUESTED))
        return Served(result=result, attempts=attempts)
    raise SourcesExhausted(attempts)
