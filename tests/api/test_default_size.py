"""A request without a size gets the server's default: a landscape hero when Pexels may serve it, the seed's
square otherwise; explicit sizes always win."""

from __future__ import annotations

from typing import Any

import pytest

from imagesmith.config import Settings
from imagesmith.jobs.service import JobService
from imagesmith.schemas import GenerationRequest
from imagesmith.sources.base import ImageRequest, SourceName, SourceState, SourceStatus


class Registry:
    """Which sources the server has: all but stock when stock_configured is false."""

    def __init__(self, stock_configured: bool) -> None:
        self.stock_configured = stock_configured

    def status(self, name: SourceName) -> SourceStatus:
        if name is SourceName.STOCK and not self.stock_configured:
            return SourceStatus(SourceState.NOT_CONFIGURED, "no key")
        return SourceStatus(SourceState.READY, "ready")


def prepared(
    settings: Settings, sources: list[SourceName], stock_configured: bool = True, **generation: Any
) -> tuple[int | None, int | None]:
    registry = Registry(stock_configured)
    service = JobService(settings, store=None, sources=registry, hub=None, worker=None)  # type: ignore[arg-type]
    request = ImageRequest(sources=sources, generation=GenerationRequest(prompt="a lake", **generation))
    ready = service.prepare(request).generation.resolve()
    return ready.width, ready.height


@pytest.mark.parametrize(
    ("sources", "size"),
    [
        ([SourceName.STOCK], (1216, 832)),
        ([SourceName.STOCK, SourceName.GENERATE], (1216, 832)),
        ([SourceName.GENERATE], (1024, 1024)),
    ],
)
def test_default_size_follows_the_sources(sources: list[SourceName], size: tuple[int, int]) -> None:
    assert prepared(Settings(), sources) == size


def test_explicit_sizes_and_settings_win() -> None:
    assert prepared(Settings(), [SourceName.STOCK], aspect="portrait") == (832, 1216)
    assert prepared(Settings(), [SourceName.STOCK], width=512, height=512) == (512, 512)
    assert prepared(Settings(stock_default_size=""), [SourceName.STOCK]) == (1024, 1024)


def test_one_side_given_takes_the_servers_default_for_the_other() -> None:
    """It took the schema's 1024: 64 wide on a server whose default is 64x64 made a 64x1024 image."""
    small = Settings(default_width=64, default_height=96)
    assert prepared(small, [SourceName.GENERATE], width=128) == (128, 96)
    assert prepared(small, [SourceName.GENERATE], height=128) == (64, 128)
    assert prepared(Settings(), [SourceName.STOCK], height=640) == (1216, 640)  # the stock default's width


def test_without_a_pexels_key_the_seed_square_stays() -> None:
    """The seed's curl example (use_pexels defaults to true) on a server without a key is generated: square."""
    both = [SourceName.STOCK, SourceName.GENERATE]
    assert prepared(Settings(), both, stock_configured=False) == (1024, 1024)


def test_several_stock_photos_in_one_request_are_refused_naming_num_images() -> None:
    from imagesmith.jobs.service import LimitExceeded

    with pytest.raises(LimitExceeded) as caught:
        prepared(Settings(), [SourceName.STOCK, SourceName.GENERATE], num_images=2)
    assert caught.value.field == "num_images" and "use_pexels=false on /api/media/generate-image" in str(
        caught.value
    )
    assert 'sources=["generate"] on /v1/jobs' in str(caught.value)
    assert prepared(Settings(), [SourceName.GENERATE], num_images=2) == (1024, 1024)
    # Without a Pexels key the request is generated, so several images are fine.
    assert prepared(Settings(), [SourceName.STOCK, SourceName.GENERATE], stock_configured=False, num_images=2)


def test_a_malformed_size_setting_is_refused_at_start_naming_the_setting() -> None:
    from pydantic import ValidationError

    for name in ("stock_default_size", "warmup_sizes"):
        with pytest.raises(ValidationError, match=name) as caught:
            Settings(**{name: "1216 by 832"})
        assert "looks like 1216x832" in str(caught.value)
    assert Settings(warmup_sizes="1024x1024, 1216x832").warmup_size_list() == [(1024, 1024), (1216, 832)]
