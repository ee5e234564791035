"""Service fixtures: a shared real server, fresh servers to kill, and in-process apps on the tiny engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_helpers import ServerProcess

from imagesmith.config import ModelPreset, Settings


@pytest.fixture(scope="session")
def server(tiny_model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server shared by the HTTP tests: tiny model, queue bound 4."""
    proc = ServerProcess(tmp_path_factory.mktemp("server"), tiny_model_home, imagesmith_queue_max="4")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def server_factory(tiny_model_home: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    made: list[ServerProcess] = []

    def make(data_dir: Path | None = None, **env: str) -> ServerProcess:
        proc = ServerProcess(data_dir or tmp_path / f"server{len(made)}", tiny_model_home, **env)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture
def app_client(tiny_engine: Any, tiny_settings: Settings, tmp_path: Path) -> Callable[..., TestClient]:
    """An in-process app (lifespan runs) sharing the session's tiny engine; settings overridable."""
    from imagesmith.api import create_app

    def make(engine_factory: Any = None, **overrides: Any) -> TestClient:
        settings = Settings(
            model=ModelPreset.TINY,
            device="cpu",
            data_dir=tmp_path / "data",
            default_width=64,
            stock_default_size="64x64",
            default_height=64,
            warmup=False,
            **overrides,
        )
        return TestClient(create_app(settings, engine_factory or (lambda _: tiny_engine)))

    return make
