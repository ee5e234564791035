"""Which source serves, and why: the policy with fakes, then once with the real stock source."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from imagesmith.config import Settings
from imagesmith.sources.errors import (
    DisallowedHost,
    NoStockResults,
    PexelsAuthError,
    PexelsBadResponse,
    PexelsNotConfigured,
    PexelsQuotaExhausted,
    PexelsUnavailable,
)
from imagesmith.sources.fallback import (
    FallbackReason,
    SourceName,
    SourcesExhausted,
    classify,
    plan_sources,
    serve_with_fallback,
)
from imagesmith.sources.stock import StockPhoto, StockPhotoSource, StockRequest

from .helpers import FakeClock
from .standin import StandIn

pytestmark = pytest.mark.anyio


class FakeSource:
    """Stands in for a source (the engine, or Pexels): counts calls, returns `value` or raises `error`."""

    def __init__(self, value: str = "generated-image", error: Exception | None = None) -> None:
        self.calls = 0
        self.value = value
        self.error = error

    async def __call__(self) -> str:
        self.calls += 1
        if self.error:
            raise self.error
        return self.value


def fake_generator() -> FakeSource:
    return FakeSource()


def stock_returning() -> FakeSource:
    return FakeSource("stock-photo")


def failing(error: Exception) -> FakeSource:
    return FakeSource(error=error)


QUOTA = PexelsQuotaExhausted(datetime(2030, 1, 1, tzinfo=UTC))


def test_plan() -> None:
    assert plan_sources(True, True) == [SourceName.PEXELS, SourceName.GENERATION]
    assert plan_sources(True, False) == [SourceName.PEXELS]
    assert plan_sources(False, True) == [SourceName.GENERATION]
    with pytest.raises(ValueError, match="both false"):
        plan_sources(False, False)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (NoStockResults("q"), FallbackReason.NO_RESULTS),
        (DisallowedHost("x"), FallbackReason.NO_RESULTS),
        (QUOTA, FallbackReason.QUOTA_EXHAUSTED),
        (PexelsNotConfigured("no key"), FallbackReason.NOT_CONFIGURED),
        (PexelsAuthError("401"), FallbackReason.AUTH_FAILED),
        (PexelsUnavailable("503"), FallbackReason.UNAVAILABLE),
        (PexelsBadResponse("json"), FallbackReason.BAD_RESPONSE),
        (RuntimeError("bug"), FallbackReason.ERROR),
    ],
)
def test_classify(error: Exception, reason: FallbackReason) -> None:
    assert classify(error) is reason


async def test_pexels_serves_when_it_can() -> None:
    stock, generate = stock_returning(), fake_generator()
    outcome = await serve_with_fallback(
        use_pexels=True, use_generation=True, fetch_stock=stock, generate=generate
    )
    assert outcome.source is SourceName.PEXELS and outcome.result == "stock-photo"
    assert outcome.reason is FallbackReason.REQUESTED and outcome.summary == "pexels"
    assert generate.calls == 0


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (NoStockResults("q"), FallbackReason.NO_RESULTS),
        (QUOTA, FallbackReason.QUOTA_EXHAUSTED),
        (PexelsUnavailable("Pexels /search answered 503 after 3 tries"), FallbackReason.UNAVAILABLE),
        (PexelsNotConfigured("no key"), FallbackReason.NOT_CONFIGURED),
        (RuntimeError("unexpected bug"), FallbackReason.ERROR),
    ],
)
async def test_generation_takes_over_and_says_why(error: Exception, reason: FallbackReason) -> None:
    generate = fake_generator()
    outcome = await serve_with_fallback(
        use_pexels=True, use_generation=True, fetch_stock=failing(error), generate=generate
    )
    assert outcome.source is SourceName.GENERATION and outcome.result == "generated-image"
    assert outcome.reason is reason and generate.calls == 1
    pexels, generation = outcome.attempts
    assert (pexels.source, pexels.served, pexels.reason, pexels.detail) == (
        SourceName.PEXELS,
        False,
        reason,
        str(error),
    )
    assert generation.served and outcome.summary == f"generation (pexels: {reason.value})"


async def test_pexels_only_failure_raises_with_reasons() -> None:
    generate = fake_generator()
    with pytest.raises(SourcesExhausted, match="pexels: quota_exhausted") as caught:
        await serve_with_fallback(
            use_pexels=True, use_generation=False, fetch_stock=failing(QUOTA), generate=generate
        )
    assert caught.value.reasons == [FallbackReason.QUOTA_EXHAUSTED] and generate.calls == 0


async def test_generation_only_never_touches_pexels() -> None:
    stock = stock_returning()
    outcome = await serve_with_fallback(
        use_pexels=False, use_generation=True, fetch_stock=stock, generate=fake_generator()
    )
    assert outcome.source is SourceName.GENERATION and outcome.reason is FallbackReason.REQUESTED
    assert stock.calls == 0


async def test_generation_errors_propagate() -> None:
    with pytest.raises(MemoryError):
        await serve_with_fallback(
            use_pexels=True,
            use_generation=True,
            fetch_stock=failing(NoStockResults("q")),
            generate=failing(MemoryError("CUDA out of memory")),
        )


async def test_real_stock_source_out_of_quota_falls_back(
    standin: StandIn, settings: Settings, clock: FakeClock
) -> None:
    standin.api_script = ["429"]
    generate = fake_generator()
    async with StockPhotoSource.from_settings(settings, clock=clock) as source:
        request = StockRequest(title="lake", width=600, height=400)

        async def fetch() -> StockPhoto | str:
            return await source.fetch(request)

        first = await serve_with_fallback(
            use_pexels=True, use_generation=True, fetch_stock=fetch, generate=generate
        )
        second = await serve_with_fallback(
            use_pexels=True, use_generation=True, fetch_stock=fetch, generate=generate
        )
        assert source.status().blocked
    assert first.source is second.source is SourceName.GENERATION
    assert first.reason is second.reason is FallbackReason.QUOTA_EXHAUSTED
    assert standin.api_calls == 1 and generate.calls == 2  # the second never called Pexels


async def test_real_stock_source_no_results_falls_back(standin: StandIn, settings: Settings) -> None:
    generate = fake_generator()
    async with StockPhotoSource.from_settings(settings) as source:

        async def fetch() -> StockPhoto | str:
            return await source.fetch(StockRequest(keywords=["nothing at all"]))

        outcome = await serve_with_fallback(
            use_pexels=True, use_generation=True, fetch_stock=fetch, generate=generate
        )
    assert outcome.source is SourceName.GENERATION and outcome.reason is FallbackReason.NO_RESULTS
    assert "nothing at all" in outcome.attempts[0].detail
