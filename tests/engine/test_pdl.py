"""IMAGESMITH_PDL: inductor's Programmatic Dependent Launch, set for what the engine compiles and named in its
levers. On the GPU, tests/gpu/test_gpu_pdl.py checks that the kernels change and the results do not."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch._inductor.config as inductor_config

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.fast import use_dependent_launches


@pytest.fixture(autouse=True)
def pdl_restored() -> Iterator[None]:
    """The flag is process-wide: leave it as found for the tests after these."""
    before = inductor_config.triton.enable_pdl
    yield
    inductor_config.triton.enable_pdl = before


def test_the_setting_turns_pdl_on_and_names_it_in_the_compile_lever(tiny_settings: Settings) -> None:
    inductor_config.triton.enable_pdl = False
    engine = Engine.start(tiny_settings.with_changes(compile="default", pdl=True, warmup=False))
    assert inductor_config.triton.enable_pdl is True
    assert "torch.compile(mode=default, dependent launches) UNets + VAE decoder" in " ".join(engine.levers)


def test_an_engine_without_it_turns_off_what_an_earlier_engine_turned_on(tiny_settings: Settings) -> None:
    """Part of inductor's cache key and process-wide: the benchmarks start engines with and without it in one
    process, and each must compile its own kernels."""
    inductor_config.triton.enable_pdl = True
    engine = Engine.start(tiny_settings.with_changes(compile="default", warmup=False))
    assert inductor_config.triton.enable_pdl is False
    assert not any("dependent launches" in lever for lever in engine.levers)


def test_pdl_without_compile_is_skipped_with_a_warning(
    tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    inductor_config.triton.enable_pdl = False
    with caplog.at_level(logging.WARNING, logger="imagesmith.engine.fast"):
        engine = Engine.start(tiny_settings.with_changes(pdl=True, warmup=False))
    assert inductor_config.triton.enable_pdl is False
    assert "pdl skipped" in caplog.text
    assert not any("dependent launches" in lever for lever in engine.levers)


def test_a_torch_without_the_option_starts_without_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(inductor_config.triton, "enable_pdl")
    with caplog.at_level(logging.WARNING, logger="imagesmith.engine.fast"):
        assert use_dependent_launches(True) == ""
    assert "has no inductor triton.enable_pdl" in caplog.text


def test_the_setting_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGESMITH_PDL", "true")
    assert Settings().pdl is True
