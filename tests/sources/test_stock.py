"""The stock source end to end against the stand-in: pick, download, fit, attribute, cache, repeat, status."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from pexels_standin import FakeClock, StandIn, make_settings, png_bomb
from PIL import Image

from imagesmith.config import Settings
from imagesmith.schemas import OutputFormat
from imagesmith.sources.attribution import read_attribution, read_exif_credit
from imagesmith.sources.errors import (
    NoStockResults,
    NothingToSearch,
    PexelsAuthError,
    PexelsNotConfigured,
    PexelsQuotaExhausted,
)
from imagesmith.sources.pexels_client import Orientation
from imagesmith.sources.stock import StockPhotoSource, StockRequest

pytestmark = pytest.mark.anyio


def source_for(settings: Settings, clock: FakeClock | None = None) -> StockPhotoSource:
    return StockPhotoSource.from_settings(settings, clock=clock or FakeClock())


async def test_fetch_serves_exact_size_with_attribution_everywhere(
    standin: StandIn, settings: Settings
) -> None:
    request = StockRequest(prompt="ignored", keywords=["mountain", "lake"], width=600, height=400)
    async with source_for(settings) as source:
        photo = await source.fetch(request)
    assert photo.query == "mountain lake" and photo.orientation is Orientation.LANDSCAPE
    assert photo.photo_id == 101  # 3:2 like the request, and relevant first
    assert (photo.width, photo.height, photo.media_type) == (600, 400, "image/jpeg")
    # The CDN was asked for the exact crop rather than the whole original.
    assert (
        "w=600" in photo.download_url and "h=400" in photo.download_url and "fit=crop" in photo.download_url
    )
    with Image.open(io.BytesIO(photo.data)) as image:
        assert image.format == "JPEG" and image.size == (600, 400)
    credit = photo.attribution
    assert credit.photographer == "Jérôme Müller"
    assert credit.credit_text == "Photo by Jérôme Müller on Pexels"
    assert credit.credit_html == (
        'Photo by <a href="https://www.pexels.com/@p101">Jérôme Müller</a> on '
        '<a href="https://www.pexels.com/photo/mountain-lake-at-sunrise-101/">Pexels</a>'
    )
    assert credit.alt == "Mountain lake at sunrise" and credit.avg_color == "#7A8B6C"
    assert read_attribution(photo.data) == credit  # the exact record, Unicode intact
    exif = read_exif_credit(photo.data)  # what any photo tool shows
    assert exif["Artist"] == "Jerome Muller"
    assert exif["Copyright"].startswith("Photo by Jerome Muller on Pexels (https://www.pexels.com/photo/")
    assert exif["ImageDescription"] == "Mountain lake at sunrise"
    with Image.open(io.BytesIO(photo.data)) as image:
        xmp = image.info["xmp"].decode()
    assert "<dc:creator><rdf:Seq><rdf:li>Jérôme Müller</rdf:li>" in xmp
    dumped = photo.model_dump(mode="json")
    assert "data" not in dumped and dumped["attribution"]["credit_text"] == credit.credit_text
    api_request = next(r for r in standin.seen if r["path"] == "/v1/search")
    image_request = next(r for r in standin.seen if r["path"].startswith("/photos/"))
    assert api_request["params"]["orientation"] == "landscape"
    assert "Authorization" not in image_request["headers"]  # the key goes to the API only


async def test_png_and_webp_carry_the_attribution_too(standin: StandIn, settings: Settings) -> None:
    async with source_for(settings) as source:
        for fmt in (OutputFormat.PNG, OutputFormat.WEBP):
            request = StockRequest(title="Harbour", width=320, height=320, output_format=fmt)
            photo = await source.fetch(request)
            with Image.open(io.BytesIO(photo.data)) as image:
                assert image.format == fmt.value.upper() and image.size == (320, 320)
                if fmt is OutputFormat.PNG:
                    assert image.info["Author"] == photo.attribution.photographer
                    assert image.info["Source"] == photo.attribution.photo_url
            assert read_attribution(photo.data) == photo.attribution
    assert standin.seen[0]["params"]["orientation"] == "square"


async def test_default_request_is_a_landscape_blog_hero(standin: StandIn, settings: Settings) -> None:
    async with source_for(settings) as source:
        photo = await source.fetch(StockRequest(prompt="a cozy cabin in snowy mountains, golden hour, 8k"))
    assert (photo.width, photo.height) == (1216, 832)
    assert photo.query == "a cozy cabin in snowy mountains"
    assert photo.photo_id == 101  # 3:2 and big enough; 102 is 16:9


async def test_cdn_ignoring_the_crop_is_fitted_locally(standin: StandIn, settings: Settings) -> None:
    standin.image_default = "ignore_params"  # the full 1800x1200 original comes back
    async with source_for(settings) as source:
        photo = await source.fetch(StockRequest(title="lake", width=500, height=500))
    with Image.open(io.BytesIO(photo.data)) as image:
        assert image.size == (500, 500)


async def test_search_results_are_cached_by_normalised_query(
    standin: StandIn, settings: Settings, clock: FakeClock
) -> None:
    async with source_for(settings, clock) as source:
        first = await source.search(StockRequest(title="Mountain Lake", width=600, height=400))
        again = await source.search(StockRequest(title="  mountain   lake!", width=640, height=424))
        assert not first.from_cache and again.from_cache
        assert standin.api_calls == 1
        other_filter = await source.search(StockRequest(title="mountain lake", width=400, height=600))
        assert not other_filter.from_cache and standin.api_calls == 2  # portrait is another search
        clock.advance(24 * 3600 + 1)
        expired = await source.search(StockRequest(title="mountain lake", width=600, height=400))
        assert not expired.from_cache and standin.api_calls == 3
        status = source.status()
    assert status.api_searches == 3 and status.cache_hits == 1 and status.cache_entries == 2


async def test_same_photo_is_not_handed_out_twice_in_a_row(standin: StandIn, settings: Settings) -> None:
    request = StockRequest(title="lake", width=600, height=400)
    async with source_for(settings) as source:
        ids = [(await source.fetch(request)).photo_id for _ in range(3)]
    assert ids[0] != ids[1] and ids[1] != ids[2]
    assert standin.api_calls == 1  # all three from one cached search


async def test_a_single_photo_may_repeat(standin: StandIn, settings: Settings) -> None:
    standin.catalogue = [standin.catalogue[0]]
    request = StockRequest(title="lake", width=600, height=400)
    async with source_for(settings) as source:
        assert {(await source.fetch(request)).photo_id for _ in range(2)} == {101}


async def test_no_results(standin: StandIn, settings: Settings) -> None:
    async with source_for(settings) as source:
        with pytest.raises(NoStockResults, match="nothing here"):
            await source.fetch(StockRequest(keywords=["nothing here"]))
        assert source.status().last_error and "NoStockResults" in source.status().last_error  # type: ignore[operator]


async def test_bad_downloads_move_on_to_the_next_candidate(standin: StandIn, settings: Settings) -> None:
    standin.image_script = ["not_image", "garbage"]
    async with source_for(settings) as source:
        photo = await source.fetch(StockRequest(title="lake", width=600, height=400))
        assert source.status().failures == 2
    assert standin.image_calls == 3 and photo.photo_id not in (101,)


@pytest.mark.parametrize(
    "download",
    [
        "placeholder",  # a 1x1 image for a 1800x1200 photo was upscaled and served as a flat "photo", credited
        "bad_encoding",  # a body that does not decode (a broken Content-Encoding)
    ],
)
async def test_a_download_that_is_not_the_photo_moves_on_to_the_next_candidate(
    standin: StandIn, settings: Settings, download: str
) -> None:
    standin.image_script = [download]
    async with source_for(settings) as source:
        photo = await source.fetch(StockRequest(title="lake", width=600, height=400))
        assert source.status().failures == 1
    assert standin.image_calls == 2 and photo.photo_id != 101
    assert Image.open(io.BytesIO(photo.data)).getextrema() != ((128, 128),) * 3  # not one flat colour


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, at 89 MP
async def test_a_png_bomb_under_the_pixel_cap_moves_on_to_the_next_candidate(
    standin: StandIn, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A 10000x10000 16-bit RGBA PNG of 0.78 MB passed the default pixel cap (100 MP) and was decoded and
    fitted: 1.2 GB at the peak. With the default settings it is refused from its header, named by its
    setting, and the next candidate served."""
    png_bomb()  # built first (seconds), so the stand-in answers within the download timeout
    standin.image_script = ["bomb"]
    with caplog.at_level(logging.WARNING, logger="imagesmith.sources.stock"):
        async with source_for(settings) as source:
            photo = await source.fetch(StockRequest(title="lake", width=600, height=400))
            assert source.status().failures == 1
    assert standin.image_calls == 2 and photo.photo_id != 101
    assert "skipped" in caplog.text and "10000x10000 RGBA, 900000000 bytes to decode and fit" in caplog.text
    assert "bytes: raise IMAGESMITH_PEXELS_MAX_IMAGE_BYTES" in caplog.text


async def test_every_download_rejected_is_no_results(standin: StandIn, settings: Settings) -> None:
    standin.image_default = "oversized"
    async with source_for(settings) as source:
        with pytest.raises(NoStockResults, match=r"could be downloaded.*cap"):
            await source.fetch(StockRequest(title="lake", width=600, height=400))
    assert standin.image_calls == 3  # three candidates tried, then given up


async def test_quota_exhausted_shows_in_status_then_resets(
    standin: StandIn, settings: Settings, clock: FakeClock
) -> None:
    standin.reset_epoch = int(clock.now) + 300
    standin.api_script = ["quota0"]
    async with source_for(settings, clock) as source:
        await source.fetch(StockRequest(title="lake", width=600, height=400))
        with pytest.raises(PexelsQuotaExhausted):
            await source.fetch(StockRequest(title="forest", width=600, height=400))
        status = source.status()
        assert status.configured and status.blocked
        assert status.quota.remaining == 0 and status.quota.limit == 200
        assert (
            status.quota.blocked_until is not None
            and status.quota.blocked_until.timestamp() == clock.now + 300
        )
        assert status.last_error and "PexelsQuotaExhausted" in status.last_error
        # A cached search still serves while blocked: no API call is needed for it.
        assert (await source.fetch(StockRequest(title="lake", width=600, height=400))).search_cached
        standin.remaining = 200  # Pexels' window renews
        clock.advance(301)
        await source.fetch(StockRequest(title="forest", width=600, height=400))
        assert not source.status().blocked and source.status().last_error is None


async def test_not_configured(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)
    async with source_for(settings) as source:
        assert not source.status().configured
        with pytest.raises(PexelsNotConfigured):
            await source.fetch(StockRequest(title="lake"))


async def test_default_allowed_hosts_refuse_the_stand_in(standin: StandIn, tmp_path: Path) -> None:
    settings = make_settings(standin, tmp_path, pexels_allowed_hosts=["images.pexels.com"])
    async with source_for(settings) as source:
        with pytest.raises(NoStockResults, match="not in pexels_allowed_hosts"):
            await source.fetch(StockRequest(title="lake", width=600, height=400))
    assert standin.image_calls == 0  # refused before any request was sent


async def test_a_failed_search_shows_in_status_until_pexels_answers_again(
    standin: StandIn, settings: Settings
) -> None:
    """The job path searches before it fetches; a failure there must reach health like a failed fetch."""
    standin.api_script = ["401"]
    async with source_for(settings) as source:
        with pytest.raises(PexelsAuthError):
            await source.search(StockRequest(title="lake", width=600, height=400))
        assert source.status().last_error and "refused the API key" in source.status().last_error
        await source.search(StockRequest(title="forest", width=600, height=400))
        assert source.status().last_error is None


async def test_a_prompt_with_no_words_is_no_results_without_asking_pexels(
    standin: StandIn, settings: Settings
) -> None:
    async with source_for(settings) as source:
        with pytest.raises(NothingToSearch, match=r"prompt '\(\(:1\.3\)\)'.*keywords, a title or a prompt"):
            await source.fetch(StockRequest(prompt="((:1.3))"))
        assert "NothingToSearch" in (source.status().last_error or "")
        for punctuation in (",,,,", "!!! ???", "-- // --"):  # these went to Pexels as queries
            with pytest.raises(NothingToSearch, match="keywords, a title or a prompt"):
                await source.fetch(StockRequest(prompt=punctuation))
    assert standin.api_calls == 0


def test_the_credit_html_links_only_to_web_pages(standin: StandIn) -> None:
    """A `javascript:` photographer URL (a hostile or tampered answer) went into the href a blog pastes into
    its pages; only http(s) links are kept, the name stays."""
    from imagesmith.sources.attribution import Attribution
    from imagesmith.sources.pexels_client import PexelsPhoto

    photo = PexelsPhoto.model_validate(
        {
            **standin.photo_json(101, 1800, 1200, "a lake"),
            "photographer_url": "javascript:alert(1)",
            "url": "data:x",
        }
    )
    credit = Attribution.from_photo(photo)
    assert "javascript:" not in credit.credit_html and "data:" not in credit.credit_html
    # The field a CMS may build its own credit from is filtered the same way (it carried the raw URL).
    assert credit.photographer_url == ""
    assert credit.credit_html.startswith(f'Photo by {photo.photographer} on <a href="https://www.pexels.com')
    fine = Attribution.from_photo(PexelsPhoto.model_validate(standin.photo_json(101, 1800, 1200, "a lake")))
    assert '<a href="https://www.pexels.com/@' in fine.credit_html or '<a href="https://' in fine.credit_html
