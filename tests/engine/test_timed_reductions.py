"""IMAGESMITH_TIMED_REDUCTIONS: inductor's multi-kernel, set for what the engine compiles and named in its levers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch._inductor.config as inductor_config

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.multi_kernel_cache import give_back_hash_lock, restore_locks_of_cached_kernels


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
    engine = Engine.start(tiny_settings.with_changes(compile="default", timed_reductions=False, warmup=False))
    assert inductor_config.triton.multi_kernel == 0
    assert not any("timed reductions" in lever for lever in engine.levers)


def test_a_compiling_engine_times_its_reductions_unless_told_not_to(tiny_settings: Settings) -> None:
    """On by default with compile since the whole GPU suite passed under it (runs 107-109)."""
    assert tiny_settings.timed_reductions is None
    inductor_config.triton.multi_kernel = 0
    engine = Engine.start(tiny_settings.with_changes(compile="reduce-overhead", warmup=False))
    assert inductor_config.triton.multi_kernel == 1
    assert "timed reductions" in " ".join(engine.levers)


def test_an_eager_engine_leaves_it_off_without_a_warning(
    tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    inductor_config.triton.multi_kernel = 0
    with caplog.at_level(logging.WARNING, logger="imagesmith.engine.fast"):
        Engine.start(tiny_settings.with_changes(warmup=False))
    assert inductor_config.triton.multi_kernel == 0
    assert "timed_reductions" not in caplog.text


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


class _SavedKernel:
    """What inductor's cache hands back: a kernel whose Triton function lost its lock to pickling."""

    def __init__(self) -> None:
        self.fn = SimpleNamespace(_hash_lock=None)
        self.restored_with: list[object] = []
        self.lock_when_used: object = "unused"

    def restore_after_unpickle(self, old_values: object) -> None:
        self.restored_with.append(old_values)
        self.fn._hash_lock = threading.RLock()

    # StaticAutotunerFuture.result() calls these two; multi-kernel then reads the lock through JITFunction.cache_key.
    def recheck_autotune_cache(self, reload_kernel_from_src: object) -> None:
        pass

    def precompile(self, **_: object) -> None:
        self.lock_when_used = self.fn._hash_lock


def test_a_kernel_loaded_from_the_compile_cache_gets_its_lock_back(tiny_settings: Settings) -> None:
    """Run 95 (H100): with multi-kernel on, a graph from the compile cache failed to load, because the cache path
    (`StaticAutotunerFuture.result`) hands back kernels without the lock multi-kernel's hashing takes. The
    setting must put the lock back before the kernel is used, through inductor's real cache class."""
    from torch._inductor.codecache import StaticAutotunerFuture

    Engine.start(tiny_settings.with_changes(compile="default", timed_reductions=True, warmup=False))
    kernel = _SavedKernel()
    future = StaticAutotunerFuture(kernel)  # type: ignore[arg-type]
    future.reload_kernel_from_src = lambda: None
    assert future.result() is kernel
    assert kernel.restored_with == [None]
    assert hasattr(kernel.lock_when_used, "acquire")


def test_a_kernel_that_kept_its_lock_is_left_alone() -> None:
    """`restore_after_unpickle(None)` also drops a kernel's launcher: never call it on one that needs nothing."""
    kernel = _SavedKernel()
    lock = threading.RLock()
    kernel.fn._hash_lock = lock
    give_back_hash_lock(kernel)
    assert kernel.restored_with == []
    assert kernel.fn._hash_lock is lock


def test_the_fix_is_installed_once() -> None:
    from torch._inductor.codecache import StaticAutotunerFuture

    assert restore_locks_of_cached_kernels()
    installed = StaticAutotunerFuture.result
    assert restore_locks_of_cached_kernels()
    assert StaticAutotunerFuture.result is installed
