"""Which source serves a request, in which order, and why: the policy the job worker calls.

The service's whole use of it:

    outcome = await serve_with_fallback(
        use_pexels=req.use_pexels,
        use_generation=req.use_generation,
        fetch_stock=lambda: stock_source.fetch(stock_request),     # async () -> StockPhoto
        generate=lambda: run_generation(req),                      # async () -> your generation result
    )
    outcome.source      # SourceName.PEXELS or SourceName.GENERATION: who served
    outcome.result      # that source's result
    outcome.reason      # why that source: "requested", or why Pexels was passed over, in words
    outcome.attempts    # every source tried, with its outcome and reason: put it in the job result

- use_pexels only: Pexels or nothing; a failure raises SourcesExhausted (attempts attached), which the API
  maps to 404 (no results) or 503 (quota, unavailable) through SourcesExhausted.reasons.
- use_generation only: generation; its errors propagate untouched (they are the engine's to map).
- both: Pexels first; when it has nothing, is out of quota, is not configured or fails, generate.
  Generation's own errors propagate, with the Pexels attempt logged.
Pexels errors are caught by type (FallbackReason); other exceptions from fetch_stock are caught too (so a bug
in the stock path never blocks a generation the user allowed) but logged with their traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from pydantic import BaseModel

from imagesmith.sources.errors import (
    DownloadRejected,
    NoStockResults,
    PexelsAuthError,
    PexelsBadResponse,
    PexelsNotConfigured,
    PexelsQuotaExhausted,
    PexelsUnavailable,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SourceName(StrEnum):
    PEXELS = "pexels"
    GENERATION = "generation"


class FallbackReason(StrEnum):
    """Why a source did not serve; the value is stable for clients and metrics labels."""

    REQUESTED = "requested"  # not a failure: the source that served was the first asked for
    NO_RESULTS = "no_results"
    QUOTA_EXHAUSTED = "quota_exhausted"
    NOT_CONFIGURED = "not_configured"
    AUTH_FAILED = "auth_failed"
    UNAVAILABLE = "unavailable"
    BAD_RESPONSE = "bad_response"
    ERROR = "error"


class SourceAttempt(BaseModel):
    source: SourceName
    served: bool
    reason: FallbackReason
    detail: str = ""  # the error's message, for people; never contains the key


def classify(error: BaseException) -> FallbackReason:
    """The reason a stock fetch failed, from the error's type."""
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


def plan_sources(use_pexels: bool, use_generation: bool) -> list[SourceName]:
    """The sources to try, in order. Pexels first: a real photo costs no GPU time."""
    plan = [SourceName.PEXELS] if use_pexels else []
    if use_generation:
        plan.append(SourceName.GENERATION)
    if not plan:
        raise ValueError("use_pexels and use_generation are both false: nothing can serve the image")
    return plan


@dataclass
class SourceOutcome(Generic[T]):
    source: SourceName
    result: T
    reason: FallbackReason
    attempts: list[SourceAttempt] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """One line for the response and the log, e.g. 'generation (pexels: quota_exhausted)'."""
        passed = [f"{a.source.value}: {a.reason.value}" for a in self.attempts if not a.served]
        return self.source.value + (f" ({'; '.join(passed)})" if passed else "")


class SourcesExhausted(Exception):
    """No allowed source could serve; `attempts` says why for each."""

    def __init__(self, attempts: list[SourceAttempt]) -> None:
        self.attempts = attempts
        details = "; ".join(f"{a.source.value}: {a.reason.value} ({a.detail})" for a in attempts)
        super().__init__(f"no source could serve the image: {details}")

    @property
    def reasons(self) -> list[FallbackReason]:
        return [attempt.reason for attempt in self.attempts]


async def serve_with_fallback(
    *,
    use_pexels: bool,
    use_generation: bool,
    fetch_stock: Callable[[], Awaitable[T]],
    generate: Callable[[], Awaitable[T]],
) -> SourceOutcome[T]:
    """Try the planned sources in order; return the first result with the story of how it was reached."""
    plan = plan_sources(use_pexels, use_generation)
    attempts: list[SourceAttempt] = []
    for source in plan:
        if source is SourceName.GENERATION:
            result = await generate()
            reason = attempts[-1].reason if attempts else FallbackReason.REQUESTED
            attempts.append(SourceAttempt(source=source, served=True, reason=FallbackReason.REQUESTED))
            return SourceOutcome(source=source, result=result, reason=reason, attempts=attempts)
        try:
            result = await fetch_stock()
        except Exception as error:
            reason = classify(error)
            if reason is FallbackReason.ERROR:
                logger.exception("stock source failed unexpectedly")
            else:
                logger.info("Pexels passed over (%s): %s", reason.value, error)
            attempts.append(SourceAttempt(source=source, served=False, reason=reason, detail=str(error)))
            continue
        attempts.append(SourceAttempt(source=source, served=True, reason=FallbackReason.REQUESTED))
        return SourceOutcome(source=source, result=result, reason=FallbackReason.REQUESTED, attempts=attempts)
    raise SourcesExhausted(attempts)
