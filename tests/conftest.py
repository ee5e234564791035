"""Shared fixtures: one tiny SDXL model and one engine per test session (built offline in seconds), and one
stand-in Pexels server (a real HTTP server on 127.0.0.1) reset before each test that uses it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

from pexels_standin import StandIn, StandInServer

from imagesmith.config import ModelPreset, Settings


@pytest.fixture(scope="session")
def tiny_model_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the tiny model, shared by the whole session (built once)."""
    home = tmp_path_factory.mktemp("imagesmith-data")
    from imagesmith.engine.tiny import ensure_tiny_sdxl

    ensure_tiny_sdxl(Settings(data_dir=home).tiny_model_dir())
    return home


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_home: Path) -> Settings:
    return Settings(model=ModelPreset.TINY, data_dir=tiny_model_home, device="cpu")


@pytest.fixture(scope="session")
def tiny_engine(tiny_settings: Settings) -> Iterator[object]:
    from imagesmith.engine import Engine

    yield Engine.start(tiny_settings)


@pytest.fixture(scope="session")
def _standin_server() -> Iterator[StandIn]:
    with StandInServer() as standin:
        yield standin


@pytest.fixture
def standin(_standin_server: StandIn) -> StandIn:
    _standin_server.reset()
    return _standin_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where torch sees CUDA; CI has none, and says so in the skip reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
