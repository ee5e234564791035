"""A request without a size gets the server's default: a landscape hero when Pexels may serve it, the seed's
square otherwise; explicit sizes always win."""

from __future__ import annotations

from typing import Any

import pytest

from imagesmith.config import Settings
from imagesmith.jobs.service import JobService
from imagesmith.schemas import GenerationRequest
from imagesmith.sources.base import ImageRequest, SourceName


def prepared(
    settings: Settings, sources: list[SourceName], **generation: Any
) -> tuple[int | None, int | None]:
    service = JobService(settings, store=None, sources=None, hub=None, worker=None)  # type: ignore[arg-type]
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
