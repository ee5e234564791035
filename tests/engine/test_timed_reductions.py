"""IMAGESMITH_TIMED_REDUCTIONS: inductor's multi-kernel, set for what the engine compiles and named in its levers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch._inductor.config as inductor_config

from imagesmith.config import Settings
from imagesmith.engine import Engine


@pytest.fixture(autouse=True)
def multi_kernel_restored() -> Iterator[None]:
    """The flag is process-wide: leave it as found for the tests after these."""
    before = inductor_config.triton.multi_kernel
    yield
    inductor_config.triton.multi_kernel = before


def test_the_setting_turns_multi_kernel_on_and_names_it_in_the_compile_lever(tiny_settings: Settings) -> None:
    inductor_config.triton.multi_kernel = 0
    engine = Engine.start(tiny_settings.with_changes(compile="default", timed_reductions=True, warmup=False))
    assert inductor_config.triton.multi_kernel == 1
    assert "torch.compile(mode=default, timed reductions) UNets + VAE decoder" in " ".join(engine.levers)


def test_an_engine_without_it_turns_off_what_an_earlier_engine_turned_on(tiny_settings: Settings) -> None:
    """Inductor's flag is global and part of its cache key: a second engine in the process (the benchmarks run
    several) must compile its own kernels, not inherit the first one's choice."""
    inductor_config.triton.multi_kernel = 1
    engine = Engine.start(tiny_settings.with_changes(compile="default", warmup=False))
    assert inductor_config.triton.multi_kernel == 0
    assert not any("timed reductions" in lever for lever in engine.levers)


def test_timed_reductions_without_compile_are_skipped_with_a_warning(
    tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    inductor_config.triton.multi_kernel = 0
    with caplog.at_level(logging.WARNING, logger="imagesmith.engine.fast"):
        engine = Engine.start(tiny_settings.with_changes(timed_reductions=True, warmup=False))
    assert inductor_config.triton.multi_kernel == 0
    assert "timed_reductions skipped" in caplog.text
    assert not any("timed reductions" in lever for lever in engine.levers)


def test_the_setting_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGESMITH_TIMED_REDUCTIONS", "true")
    assert Settings().timed_reductions is True
