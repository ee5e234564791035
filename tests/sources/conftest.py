"""Fixtures for the stock-photo tests (the stand-in Pexels server itself is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pexels_standin import FakeClock, StandIn, make_settings

from imagesmith.config import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(standin: StandIn, tmp_path: Path) -> Settings:
    return make_settings(standin, tmp_path)
