"""Fixtures for the stock-photo tests: one stand-in Pexels server per session, reset before each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagesmith.config import Settings

from .helpers import FakeClock, make_settings
from .standin import StandIn, StandInServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def _standin_server() -> Iterator[StandIn]:
    with StandInServer() as standin:
        yield standin


@pytest.fixture
def standin(_standin_server: StandIn) -> StandIn:
    _standin_server.reset()
    return _standin_server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(standin: StandIn, tmp_path: Path) -> Settings:
    return make_settings(standin, tmp_path)
