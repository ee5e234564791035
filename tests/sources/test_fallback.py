"""Which source serves, and why: the policy with fake sources, then the real stock source behind the protocol."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pexels_standin import FakeClock, StandIn, make_settings

from imagesmith.config import Settings
from imagesmith.engine.progress import CancelToken, GenerationCanceled
from imagesmith.schemas import GenerationRequest, OutputFormat
from imagesmith.sources.attribution import read_attribution
from imagesmith.sources.base import (
    FallbackReason,
    ImageRequest,
    ImageSource,
    NoMatch,
    SourceImage,
    SourceName,
    SourceResult,
    SourceState,
    SourceStatus,
    SourceUnavailable,
)
from imagesmith.sources.errors import (
    DisallowedHost,
    NoStockResults,
    PexelsAuthError,
    PexelsBadResponse,
    PexelsNotConfigured,
    PexelsQuotaExhausted,
    PexelsUnavailable,
)
from imagesmith.sources.fallback import SourcesExhausted, classify, serve_first
from imagesmith.sources.stock_source import StockSource, stock_request

RESET = datetime(2030, 1, 1, tzinfo=UTC)


class FakeSource:
    """Counts calls; returns a one-pixel result or raises `error`."""

    def __init__(self, name: SourceName, error: Exception | None = None) -> None:
        self.name, self.error, self.calls = name, error, 0

    def status(self) -> SourceStatus:
        return SourceStatus(SourceState.READY)

    def close(self) -> None:
        pass

    def fetch(self, request: ImageRequest, on_progress: Any = None, cancel: Any = None) -> SourceResult:
        self.calls += 1
        if self.error:
            raise self.error
        return SourceResult(self.name, [SourceImage(b"x", "image/png", 1, 1)])


def request(*sources: SourceName, **fields: Any) -> ImageRequest:
    generation = GenerationRequest(prompt="a mountain lake at dawn, 8k", **fields)
    return ImageRequest(sources=list(sources), generation=generation, title=None, keywords=[])


def lookup(*sources: FakeSource) -> Any:
    table: dict[SourceName, ImageSource] = {source.name: source for source in sources}
    return table.get


STOCK, GENERATE = SourceName.STOCK, SourceName.GENERATE


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (NoStockResults("q"), FallbackReason.NO_RESULTS),
        (DisallowedHost("x"), FallbackReason.NO_RESULTS),
        (PexelsQuotaExhausted(RESET), FallbackReason.QUOTA_EXHAUSTED),
        (PexelsNotConfigured("no key"), FallbackReason.NOT_CONFIGURED),
        (PexelsAuthError("401"), FallbackReason.AUTH_FAILED),
        (PexelsUnavailable("503"), FallbackReason.UNAVAILABLE),
        (PexelsBadResponse("json"), FallbackReason.BAD_RESPONSE),
        (RuntimeError("bug"), FallbackReason.ERROR),
    ],
)
def test_classify(error: Exception, reason: FallbackReason) -> None:
    assert classify(error) is reason


def test_first_choice_serves_when_it_can() -> None:
    stock, generate = FakeSource(STOCK), FakeSource(GENERATE)
    served = serve_first(request(STOCK, GENERATE), lookup(stock, generate))
    assert served.source is STOCK and served.reason is FallbackReason.REQUESTED
    assert served.summary == "requested" and generate.calls == 0
    assert [(a.source, a.served) for a in served.attempts] == [(STOCK, True)]


@pytest.mark.parametrize(
    "error",
    [
        NoMatch("Pexels has no photo for 'lake'"),
        SourceUnavailable("Pexels quota exhausted", FallbackReason.QUOTA_EXHAUSTED, RESET),
        SourceUnavailable("Pexels /search answered 503 after 3 tries"),
        SourceUnavailable("TypeError: a bug", FallbackReason.ERROR),
    ],
)
def test_generation_takes_over_and_says_why(error: SourceUnavailable) -> None:
    generate = FakeSource(GENERATE)
    served = serve_first(request(STOCK, GENERATE), lookup(FakeSource(STOCK, error), generate))
    assert served.source is GENERATE and served.reason is error.reason and generate.calls == 1
    passed, took_over = served.attempts
    assert (passed.source, passed.served, passed.reason, passed.detail, passed.retry_at) == (
        STOCK,
        False,
        error.reason,
        str(error),
        error.retry_at,
    )
    assert took_over.served and served.summary == f"stock: {error.reason.value} ({error})"


def test_an_unconfigured_source_is_passed_over() -> None:
    served = serve_first(request(STOCK, GENERATE), lookup(FakeSource(GENERATE)))
    assert served.source is GENERATE and served.reason is FallbackReason.NOT_CONFIGURED


def test_stock_only_failure_raises_with_reasons_and_retry_time() -> None:
    generate = FakeSource(GENERATE)
    quota = SourceUnavailable("spent", FallbackReason.QUOTA_EXHAUSTED, RESET)
    with pytest.raises(SourcesExhausted, match="stock: quota_exhausted") as caught:
        serve_first(request(STOCK), lookup(FakeSource(STOCK, quota), generate))
    assert caught.value.reasons == [FallbackReason.QUOTA_EXHAUSTED] and generate.calls == 0
    assert caught.value.reason is FallbackReason.QUOTA_EXHAUSTED and caught.value.retry_at == RESET


def test_generation_only_never_touches_stock() -> None:
    stock = FakeSource(STOCK)
    served = serve_first(request(GENERATE), lookup(stock, FakeSource(GENERATE)))
    assert served.source is GENERATE and served.reason is FallbackReason.REQUESTED and stock.calls == 0


def test_other_errors_fail_the_job_as_they_are() -> None:
    generate = FakeSource(GENERATE, MemoryError("CUDA out of memory"))
    with pytest.raises(MemoryError):
        serve_first(request(STOCK, GENERATE), lookup(FakeSource(STOCK, NoMatch("none")), generate))


# --- the real stock source behind the protocol, against the stand-in --------------------------------------


@pytest.fixture
def stock(settings: Settings, clock: FakeClock) -> Any:
    source = StockSource(settings, clock=clock)
    yield source
    source.close()


def test_stock_request_follows_the_job(settings: Settings) -> None:
    job = ImageRequest(
        sources=[STOCK],
        generation=GenerationRequest(prompt="p", width=640, height=320, output_format=OutputFormat.WEBP),
        title="Lakes",
        keywords=["mountain", "lake"],
    )
    made = stock_request(job)
    assert (made.query(), made.width, made.height, made.output_format) == (
        "mountain lake",
        640,
        320,
        OutputFormat.WEBP,
    )
    assert stock_request(job.model_copy(update={"keywords": []})).query() == "Lakes"


def test_stock_source_serves_a_photo_with_its_credit(standin: StandIn, stock: StockSource) -> None:
    result = stock.fetch(request(STOCK, width=96, height=64, output_format=OutputFormat.JPEG))
    assert result.source is STOCK and len(result.images) == 1
    image = result.images[0]
    assert (image.width, image.height, image.media_type) == (96, 64, "image/jpeg")
    assert result.attribution is not None and result.attribution["credit_text"].startswith("Photo by ")
    embedded = read_attribution(image.data)
    assert embedded is not None and embedded.model_dump(mode="json") == result.attribution
    assert result.metadata["provider"] == "pexels" and result.metadata["query"] == "a mountain lake at dawn"
    status = stock.status()
    assert status.state is SourceState.READY and status.info["photos_served"] == 1


def test_stock_source_out_of_quota_falls_back_and_reports_blocked(
    standin: StandIn, stock: StockSource, clock: FakeClock
) -> None:
    standin.api_script = ["429"]
    generate = FakeSource(GENERATE)
    first = serve_first(request(STOCK, GENERATE), lookup(stock, generate))  # type: ignore[arg-type]
    second = serve_first(request(STOCK, GENERATE), lookup(stock, generate))  # type: ignore[arg-type]
    assert first.source is second.source is GENERATE
    assert first.reason is second.reason is FallbackReason.QUOTA_EXHAUSTED
    assert first.attempts[0].retry_at is not None
    assert standin.api_calls == 1 and generate.calls == 2  # the second never called Pexels
    status = stock.status()
    assert status.state is SourceState.BLOCKED and "calls resume at" in status.detail
    assert status.info["blocked"] is True and status.info["errors"] == {"quota_exhausted": 2}
    clock.advance(601)  # past pexels_quota_backoff_s: calls resume
    assert stock.status().state is SourceState.READY
    assert serve_first(request(STOCK, GENERATE), lookup(stock, generate)).source is STOCK  # type: ignore[arg-type]


def test_stock_source_no_results_and_bad_key(standin: StandIn, stock: StockSource) -> None:
    with pytest.raises(NoMatch, match="nothing at all") as caught:
        stock.fetch(_titled("nothing at all"))
    assert caught.value.reason is FallbackReason.NO_RESULTS
    standin.api_default = "401"
    with pytest.raises(SourceUnavailable) as refused:
        stock.fetch(_titled("lake"))
    assert refused.value.reason is FallbackReason.AUTH_FAILED
    assert stock.status().state is SourceState.FAILED  # honest: the key is refused


def test_a_refused_key_stays_reported_through_network_and_quota_errors(
    standin: StandIn, stock: StockSource, clock: FakeClock
) -> None:
    standin.api_script = ["401", "500", "500", "500", "429"]  # a 500 is tried 3 times
    for _ in range(3):  # refused, then upstream trouble (retried inside), then a 429
        with pytest.raises(SourceUnavailable):
            stock.fetch(_titled("lake"))
    clock.advance(601)  # the 429's block is over; nothing has shown the key to work since the 401
    assert stock.status().state is SourceState.FAILED
    stock.fetch(_titled("lake"))  # a photo served: the key works again
    assert stock.status().state is SourceState.READY


def test_an_api_root_without_search_shows_as_failed_naming_the_setting(
    standin: StandIn, tmp_path: Path, clock: FakeClock
) -> None:
    """A wrong IMAGESMITH_PEXELS_API_BASE_URL path: every stock request failed with reason "error" (which
    the docs define as a bug, logged with a traceback) while health said "Pexels configured"."""
    source = StockSource(
        make_settings(standin, tmp_path, pexels_api_base_url=standin.base_url + "/v2"), clock=clock
    )
    try:
        with pytest.raises(SourceUnavailable) as refused:
            source.fetch(_titled("lake"))
        assert refused.value.reason is FallbackReason.NOT_CONFIGURED
        status = source.status()
        assert status.state is SourceState.FAILED and "IMAGESMITH_PEXELS_API_BASE_URL" in status.detail
    finally:
        source.close()


def _titled(title: str) -> ImageRequest:
    return ImageRequest(sources=[STOCK], generation=GenerationRequest(prompt="p"), title=title)


def test_cancel_stops_a_slow_fetch(standin: StandIn, stock: StockSource) -> None:
    standin.api_default, standin.delay_s = "slow", 0.4
    cancel = CancelToken()
    threading.Timer(0.05, cancel.cancel).start()
    with pytest.raises(GenerationCanceled):
        stock.fetch(_titled("lake"), cancel=cancel)


def test_close_is_idempotent_and_refuses_later_fetches(settings: Settings) -> None:
    source = StockSource(settings)
    source.close()
    source.close()
    with pytest.raises(SourceUnavailable, match="shut down"):
        source.fetch(_titled("lake"))


def test_stock_source_passes_a_prompt_with_no_words_as_no_results(
    standin: StandIn, stock: StockSource, caplog: pytest.LogCaptureFixture
) -> None:
    standin.api_default = "401"
    with pytest.raises(SourceUnavailable):
        stock.fetch(_titled("lake"))
    job = ImageRequest(sources=[STOCK, GENERATE], generation=GenerationRequest(prompt="((:1.3))"))
    generate = FakeSource(GENERATE)
    with caplog.at_level(logging.INFO):
        served = serve_first(job, lookup(stock, generate))  # type: ignore[arg-type]
    assert served.source is GENERATE and served.reason is FallbackReason.NO_RESULTS
    assert "prompt" in served.summary and "keywords" in served.summary
    assert not [record for record in caplog.records if record.exc_info]  # no "failed unexpectedly" traceback
    assert standin.api_calls == 1  # only the refused one: nothing was searched
    assert stock.status().state is SourceState.FAILED  # no search answered, so the refused key stays reported


def test_stock_source_status_survives_a_reset_header_in_milliseconds(
    standin: StandIn, stock: StockSource
) -> None:
    """status() feeds the worker loop, /health and /metrics: one odd header must not break them for good."""
    standin.reset_epoch = 1_900_000_000_000
    stock.fetch(_titled("lake"))
    status = stock.status()
    assert status.state is SourceState.READY and status.info["quota"]["reset_at"] is None
