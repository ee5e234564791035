"""The Pexels API client against the stand-in server: shapes, errors, retries, quota, and the secret key."""

from __future__ import annotations

import email.utils
import logging
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pexels_standin import API_KEY, FakeClock, StandIn, make_settings

from imagesmith.config import Settings
from imagesmith.sources.errors import (
    PexelsAuthError,
    PexelsBadResponse,
    PexelsNotConfigured,
    PexelsNotFound,
    PexelsQuotaExhausted,
    PexelsUnavailable,
)
from imagesmith.sources.pexels_client import Orientation, PexelsClient, PhotoSize
from imagesmith.sources.retry import backoff_delay

pytestmark = pytest.mark.anyio


def client_for(settings: Settings, clock: FakeClock | None = None) -> PexelsClient:
    return PexelsClient.from_settings(settings, clock=clock or FakeClock())


async def test_search_success_parses_photos_and_sends_key_and_filters(
    standin: StandIn, settings: Settings
) -> None:
    async with client_for(settings) as client:
        page = await client.search(
            "  mountain lake ",
            orientation=Orientation.LANDSCAPE,
            size=PhotoSize.MEDIUM,
            color="#ffaa00",
            locale="de-DE",
            per_page=80,
        )
    assert page.total_results == 4 and len(page.photos) == 4  # the landscape ones
    photo = page.photos[0]
    assert (photo.id, photo.width, photo.height) == (101, 1800, 1200)
    assert photo.photographer == "Jérôme Müller" and photo.alt == "Mountain lake at sunrise"
    assert photo.src.original.endswith("/photos/101/pexels-photo-101.jpeg") and photo.avg_color == "#7A8B6C"
    request = standin.seen[-1]
    assert request["headers"]["Authorization"] == API_KEY  # the bare key, as Pexels wants it
    assert request["params"] == {
        "query": "mountain lake",
        "page": "1",
        "per_page": "80",
        "orientation": "landscape",
        "size": "medium",
        "color": "#ffaa00",
        "locale": "de-DE",
    }
    assert client.quota.limit == 200 and client.quota.remaining == 198


async def test_get_photo_and_404(standin: StandIn, settings: Settings) -> None:
    async with client_for(settings) as client:
        photo = await client.get_photo(104)
        assert (photo.width, photo.height) == (1200, 1800)
        with pytest.raises(PexelsNotFound):
            await client.get_photo(999)


async def test_one_odd_photo_costs_that_photo_not_the_page(
    standin: StandIn, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A page of good photos with one whose photographer is null was refused whole (a 503 for stock-only
    requests) though the other photos were fine."""
    standin.api_script = ["one_bad"]
    async with client_for(settings) as client:
        with caplog.at_level(logging.WARNING, logger="imagesmith.sources.pexels_client"):
            page = await client.search("lake", per_page=80)
        whole = await client.search("lake", per_page=80)
    assert [photo.id for photo in page.photos] == [photo.id for photo in whole.photos][:-1]
    assert "1 of 6 photos left out" in caplog.text and "photographer" in caplog.text


async def test_a_search_404_names_the_base_url_setting(standin: StandIn, tmp_path: Path) -> None:
    """An API root with no search (a wrong path) is a setting to fix, not a missing photo or a bug: it said
    "Pexels has nothing at /search (404)", classified as an error, and `doctor` passed it as transient."""
    settings = make_settings(standin, tmp_path, pexels_api_base_url=standin.base_url + "/v2")
    async with client_for(settings) as client:
        with pytest.raises(PexelsNotConfigured, match=r"/v2/search \(404\): IMAGESMITH_PEXELS_API_BASE_URL"):
            await client.search("lake")


async def test_no_results_is_an_empty_page(standin: StandIn, settings: Settings) -> None:
    standin.api_default = "empty"
    async with client_for(settings) as client:
        page = await client.search("anything")
    assert page.photos == [] and page.total_results == 0


async def test_bad_key_raises_auth_error_without_retry(standin: StandIn, tmp_path: Path) -> None:
    settings = make_settings(standin, tmp_path, pexels_api_key="wrong-key")
    async with client_for(settings) as client:
        with pytest.raises(PexelsAuthError, match="401"):
            await client.search("cats")
    assert standin.api_calls == 1


async def test_429_without_headers_blocks_until_default_backoff(
    standin: StandIn, settings: Settings, clock: FakeClock
) -> None:
    standin.api_script = ["429"]
    async with client_for(settings, clock) as client:
        with pytest.raises(PexelsQuotaExhausted) as caught:
            await client.search("cats")
        # The reset from the earlier answers is unknown here (none came), so the default backoff applies.
        assert caught.value.retry_at == datetime.fromtimestamp(clock.now + 600, tz=UTC)
        with pytest.raises(PexelsQuotaExhausted):
            await client.search("dogs")
        assert standin.api_calls == 1  # blocked: the second search never reached the server
        snapshot = client.quota.snapshot()
        # Blocked, but how much of the month is left no answer said: not 0 (an hourly 429 spends no quota).
        assert snapshot.remaining is None and snapshot.blocked_reason == "429 Too Many Requests"
        clock.advance(601)
        assert (await client.search("dogs")).photos
    assert standin.api_calls == 2


async def test_429_uses_the_last_known_reset(standin: StandIn, settings: Settings, clock: FakeClock) -> None:
    standin.reset_epoch = int(clock.now) + 42
    standin.api_script = ["ok", "429"]
    async with client_for(settings, clock) as client:
        await client.search("cats")
        with pytest.raises(PexelsQuotaExhausted) as caught:
            await client.search("cats")
    assert caught.value.retry_at.timestamp() == clock.now + 42


async def test_a_429_with_calls_left_is_the_hourly_limit_not_the_months(
    standin: StandIn, settings: Settings, clock: FakeClock
) -> None:
    """Pexels' reset is the monthly period's; a 429 while Remaining is above 0 is its hourly limit. Blocking
    until the reset switched stock photos off for ten days after one busy hour."""
    standin.reset_epoch = int(clock.now) + 10 * 86_400
    standin.api_script = ["ok", "429"]
    async with client_for(settings, clock) as client:
        await client.search("cats")  # Remaining 198 of 200
        with pytest.raises(PexelsQuotaExhausted) as caught:
            await client.search("dogs")
        # Health and the remaining-quota metric keep the month's count: 0 there read as "the month is spent".
        assert client.quota.snapshot().remaining == 198
    assert caught.value.retry_at.timestamp() == clock.now + 600  # the backoff, not the month's end


async def test_5xx_then_success_is_retried(standin: StandIn, settings: Settings) -> None:
    standin.api_script = ["500", "500"]
    async with client_for(settings) as client:
        page = await client.search("cats")
    assert page.photos and standin.api_calls == 3


async def test_5xx_every_time_is_unavailable(standin: StandIn, settings: Settings) -> None:
    standin.api_default = "500"
    async with client_for(settings) as client:
        with pytest.raises(PexelsUnavailable, match="after 3 tries"):
            await client.search("cats")
    assert standin.api_calls == 3


async def test_timeout_is_retried_then_unavailable(standin: StandIn, tmp_path: Path) -> None:
    settings = make_settings(standin, tmp_path, pexels_timeout_s=0.2, pexels_max_retries=1)
    standin.delay_s = 0.6
    standin.api_default = "slow"
    async with client_for(settings) as client:
        with pytest.raises(PexelsUnavailable, match=r"Timeout|took over 0\.2s"):
            await client.search("cats")
    assert standin.api_calls == 2


async def test_an_api_answer_dripping_in_meets_a_deadline(standin: StandIn, tmp_path: Path) -> None:
    """Every piece arrives within the per-read timeout; the deadline on the whole answer still ends it."""
    settings = make_settings(standin, tmp_path, pexels_timeout_s=0.3, pexels_max_retries=0)
    standin.api_default = "drip"
    standin.drip_interval_s = 0.1
    async with client_for(settings) as client:
        with pytest.raises(PexelsUnavailable, match=r"took over 0\.3s to answer"):
            await client.search("cats")


async def test_timeout_then_success(standin: StandIn, tmp_path: Path) -> None:
    settings = make_settings(standin, tmp_path, pexels_timeout_s=0.2)
    standin.delay_s = 0.6
    standin.api_script = ["slow"]
    async with client_for(settings) as client:
        assert (await client.search("cats")).photos


def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def unreachable_search(tmp_path: Path, base_url: str) -> PexelsUnavailable:
    """The error a search at `base_url` (nothing listening) ends in, after one retry."""
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        pexels_api_key="k",
        pexels_api_base_url=base_url,
        pexels_retry_backoff_s=0.001,
        pexels_max_retries=1,
    )
    async with client_for(settings) as client:
        with pytest.raises(PexelsUnavailable) as refused:
            await client.search("cats")
    return refused.value


async def test_network_error_is_unavailable_and_names_the_host(tmp_path: Path) -> None:
    port = closed_port()
    error = await unreachable_search(tmp_path, f"http://127.0.0.1:{port}/v1")
    assert f"ConnectError calling Pexels /search at 127.0.0.1:{port} after 2 tries" in str(error)


async def test_a_network_error_names_the_host_but_not_the_base_urls_password(tmp_path: Path) -> None:
    """A proxy's credentials in IMAGESMITH_PEXELS_API_BASE_URL must not reach the error, which a job's
    attempts show to clients."""
    port = closed_port()
    error = await unreachable_search(tmp_path, f"http://user:s3cret@127.0.0.1:{port}/v1")
    assert f"at 127.0.0.1:{port}" in str(error)
    assert "s3cret" not in str(error) and "user" not in str(error)


# Each bad 200 answer, and what the refusal must say.
BAD_ANSWERS = [
    ("malformed", "malformed JSON"),
    ("bad_shape", r"photos\.0\.height"),
    # A gzip bomb was read whole (a 300 KB answer took the server from 1.3 to 2.2 GB): the body is capped.
    ("gzip_bomb", "answered more than 2000000 bytes"),
    # A 200 without photos was "no results" (cached for a day); a 400-digit width overflowed the ranking.
    ("no_photos", "photos"),
    ("huge_width", r"photos\.0\.width"),
]


async def test_malformed_json_and_wrong_shape_are_bad_responses(standin: StandIn, settings: Settings) -> None:
    standin.api_script = [behaviour for behaviour, _ in BAD_ANSWERS]
    async with client_for(settings) as client:
        for _, refusal in BAD_ANSWERS:
            with pytest.raises(PexelsBadResponse, match=refusal):
                await client.search("cats")
        assert (await client.search("cats")).photos  # Pexels is back: nothing of the bad answers stayed


async def test_quota_remaining_zero_blocks_until_reset(
    standin: StandIn, settings: Settings, clock: FakeClock
) -> None:
    standin.reset_epoch = int(clock.now) + 120
    standin.api_script = ["quota0"]
    async with client_for(settings, clock) as client:
        assert (await client.search("cats")).photos  # the answer that spent the quota is still good
        with pytest.raises(PexelsQuotaExhausted) as caught:
            await client.search("cats")
        assert caught.value.retry_at.timestamp() == clock.now + 120
        assert client.quota.snapshot().blocked_until is not None
        assert standin.api_calls == 1
        standin.remaining = 200
        clock.advance(121)  # the reset time passes
        assert client.quota.snapshot().blocked_until is None
        assert (await client.search("cats")).photos
        assert client.quota.remaining == 199
    assert standin.api_calls == 2


async def test_no_key_is_not_configured(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, pexels_api_key="  ")
    assert settings.pexels_api_key is None
    async with client_for(settings) as client:
        assert not client.configured
        with pytest.raises(PexelsNotConfigured, match="IMAGESMITH_PEXELS_API_KEY"):
            await client.search("cats")


async def test_arguments_are_checked_before_calling(settings: Settings) -> None:
    async with client_for(settings) as client:
        with pytest.raises(ValueError, match="per_page must be between 1 and 80"):
            await client.search("cats", per_page=81)
        with pytest.raises(ValueError, match="whitespace"):
            await client.search("   ")


async def test_key_never_in_logs_reprs_or_errors(
    standin: StandIn, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore included
    standin.api_script = ["500", "ok", "401"]
    errors: list[str] = []
    async with client_for(settings) as client:
        await client.search("cats")
        try:
            await client.search("cats")
        except PexelsAuthError as error:
            errors.append(str(error) + repr(error))
        texts = [repr(client), str(settings), repr(settings), *errors]
    assert caplog.records, "debug logging should have captured the requests"
    assert API_KEY not in caplog.text
    for text in texts:
        assert API_KEY not in text


def test_backoff_grows_and_is_capped() -> None:
    class Fixed:
        def random(self) -> float:
            return 1.0

    fixed = Fixed()
    delays = [backoff_delay(n, 0.5, cap_s=3.0, rng=fixed) for n in range(5)]  # type: ignore[arg-type]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert 0.25 <= backoff_delay(0, 0.5) <= 0.5  # jitter never drops below half the ceiling


# --- headers, keys and bodies that are not what they should be ---------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Ratelimit-Reset": "1900000000000"},  # milliseconds
        {"X-Ratelimit-Reset": "inf"},
        {"X-Ratelimit-Reset": "1e999"},
        {"X-Ratelimit-Reset": "12345"},  # 1970
        {"X-Ratelimit-Remaining": "1e999", "X-Ratelimit-Limit": "nan"},
    ],
)
async def test_implausible_rate_limit_headers_are_ignored(
    standin: StandIn, settings: Settings, clock: FakeClock, headers: dict[str, str]
) -> None:
    standin.reset_epoch = int(clock.now) + 3600
    async with client_for(settings, clock) as client:
        await client.search("cats")  # a plausible reset first: a bad one later must not replace it
        standin.api_headers = headers
        assert (await client.search("cats")).photos
        snapshot = client.quota.snapshot()  # raised ValueError/OverflowError for ever after, before the fix
    assert snapshot.reset_at == datetime.fromtimestamp(clock.now + 3600, tz=UTC)
    assert snapshot.remaining is not None and snapshot.limit == 200


@pytest.mark.parametrize(
    ("retry_after", "wait_s"), [("1e12", 86_400), ("inf", 600), ("30", 30), ("next week", 600)]
)
async def test_retry_after_is_capped_at_a_day_and_garbage_ignored(
    standin: StandIn, settings: Settings, clock: FakeClock, retry_after: str, wait_s: float
) -> None:
    standin.api_script = ["429"]
    standin.api_headers = {"Retry-After": retry_after}
    async with client_for(settings, clock) as client:
        with pytest.raises(PexelsQuotaExhausted) as caught:
            await client.search("cats")
        snapshot = client.quota.snapshot()
    # 'inf' is not a wait: the default backoff (pexels_quota_backoff_s) applies.
    assert caught.value.retry_at == datetime.fromtimestamp(clock.now + wait_s, tz=UTC)
    assert snapshot.blocked_until == caught.value.retry_at


@pytest.mark.parametrize(("ahead_s", "wait_s"), [(120, 120), (-60, 0), (3 * 86_400, 86_400)])
async def test_retry_after_as_an_http_date_is_honoured(
    standin: StandIn, settings: Settings, clock: FakeClock, ahead_s: float, wait_s: float
) -> None:
    """RFC 9110 allows an HTTP-date; proxies and CDNs in front of an API send one. A date in the past means
    now; one days ahead is capped like a number."""
    standin.api_script = ["429"]
    when = datetime.fromtimestamp(clock.now + ahead_s, tz=UTC)
    standin.api_headers = {"Retry-After": email.utils.format_datetime(when, usegmt=True)}
    async with client_for(settings, clock) as client:
        with pytest.raises(PexelsQuotaExhausted) as caught:
            await client.search("cats")
    assert caught.value.retry_at == datetime.fromtimestamp(clock.now + wait_s, tz=UTC)


async def test_remaining_is_unknown_once_a_block_has_passed(
    standin: StandIn, settings: Settings, clock: FakeClock
) -> None:
    standin.reset_epoch = int(clock.now) + 120
    standin.api_script = ["quota0"]
    async with client_for(settings, clock) as client:
        await client.search("cats")
        assert client.quota.snapshot().remaining == 0
        clock.advance(121)  # no call since: nobody knows what is left, and it is not 0 any more
        snapshot = client.quota.snapshot()
    assert snapshot.blocked_until is None and snapshot.remaining is None and snapshot.limit == 200


async def test_a_key_with_a_trailing_newline_works(standin: StandIn, tmp_path: Path) -> None:
    """Secret files (Docker, Kubernetes) end in a newline; no Pexels key has whitespace around it."""
    settings = make_settings(standin, tmp_path, pexels_api_key=f"  {API_KEY}\n")
    async with client_for(settings) as client:
        assert (await client.search("cats")).photos
    assert standin.seen[-1]["headers"]["Authorization"] == API_KEY


@pytest.mark.parametrize(
    ("key", "base_url"),
    [
        (API_KEY[:8] + "\n" + API_KEY[8:], None),  # a line break inside: not a legal header value
        (API_KEY + "é", None),  # not ASCII
        (API_KEY, "127.0.0.1:1/v1"),  # no http(s)://
    ],
)
async def test_a_request_that_cannot_be_sent_is_a_config_error_not_retried(
    standin: StandIn, tmp_path: Path, key: str, base_url: str | None
) -> None:
    settings = make_settings(standin, tmp_path, pexels_api_key=key)
    # Refused by the settings when they load; the client still says it for one that came in unchecked.
    if base_url:
        settings = settings.model_copy(update={"pexels_api_base_url": base_url})
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with PexelsClient.from_settings(settings, clock=FakeClock(), sleep=sleep) as client:
        with pytest.raises(PexelsNotConfigured, match="IMAGESMITH_PEXELS_API_KEY") as caught:
            await client.search("cats")
    assert sleeps == [] and standin.api_calls == 0
    assert API_KEY[8:] not in str(caught.value)  # h11's own message quotes the header value


async def test_a_body_that_does_not_decode_is_a_bad_response(standin: StandIn, settings: Settings) -> None:
    standin.api_script = ["bad_encoding"]
    async with client_for(settings) as client:
        with pytest.raises(PexelsBadResponse, match="does not decode"):
            await client.search("cats")
        assert (await client.search("cats")).photos
    assert standin.api_calls == 2  # not retried
