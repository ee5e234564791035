"""A compiled pass that fails inside torch.compile's machinery is served eager, and the work is still done.

On an H200 a CUDA-graph capture failed (cuDNN timing a convolution inside the capture, run 27 in
docs/benchmarks.md) and left its thread's allocator recording into the graph's pool, so every later pass failed
too. These tests make a compiled module fail for real (a torch.compile backend whose compiled code raises), on
the CPU, and check what the engine does about it. Also here: the warm-up's second round, which records the CUDA
graphs the first round only warmed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from imagesmith.engine import Engine
from imagesmith.engine.fast import compiled_modules, raised_in_compiled_code, warm_up
from imagesmith.engine.gpu_thread import GpuThread
from imagesmith.schemas import GenerationRequest


def _request(seed: int) -> GenerationRequest:
    return GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=4, seed=seed)


def _failing_backend(graph: Any, example_inputs: Any) -> Any:
    """A compiler whose compiled code fails when it runs, as a failed CUDA-graph capture does."""

    def run(*args: Any) -> Any:
        raise RuntimeError("FIND was unable to find an engine to execute this computation")

    return run


@pytest.fixture(autouse=True)
def _uncompiled_afterwards(tiny_engine: Engine) -> Iterator[None]:
    """The tiny models are shared by the tests' engines: leave them as found."""
    yield
    for module in compiled_modules(tiny_engine):
        module._compiled_call_impl = None


def _pixels(engine: Engine, seed: int) -> np.ndarray:
    return np.asarray(engine.generate(_request(seed)).images[0])


def test_a_failing_compiled_module_falls_back_to_eager_and_the_pass_is_done(tiny_engine: Engine) -> None:
    eager_pixels = _pixels(tiny_engine, 7)
    decoder = tiny_engine.models.base.vae.decoder
    decoder.compile(backend=_failing_backend)
    tiny_engine.levers.append("torch.compile(mode=reduce-overhead) UNets + VAE decoder")
    assert compiled_modules(tiny_engine) == [decoder]
    thread_before = tiny_engine._gpu.ident

    pixels = _pixels(tiny_engine, 7)  # the compiled decoder raises; the pass runs again, eager

    np.testing.assert_array_equal(pixels, eager_pixels)
    assert compiled_modules(tiny_engine) == []
    assert tiny_engine.levers[-1] == "torch.compile failed, eager instead (RuntimeError)"
    assert not any(lever.startswith("torch.compile(") for lever in tiny_engine.levers)
    # A new GPU thread: the failed one's per-thread CUDA state is not to be trusted.
    assert tiny_engine._gpu.ident is not None and tiny_engine._gpu.ident != thread_before
    np.testing.assert_array_equal(_pixels(tiny_engine, 8), _pixels(tiny_engine, 8))


def test_an_error_outside_compiled_code_is_not_taken_for_a_compile_failure(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = tiny_engine.models.base.vae.decoder
    decoder.compile(backend="eager")  # compiled, and working
    unet = tiny_engine.models.base.unet

    def broken_forward(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in the model code")

    monkeypatch.setattr(unet, "forward", broken_forward)
    with pytest.raises(ValueError, match="a bug in the model code"):
        tiny_engine.generate(_request(1))
    assert compiled_modules(tiny_engine) == [decoder], "an unrelated error turned compile off"


def test_raised_in_compiled_code_looks_at_where_the_error_came_from() -> None:
    import torch

    def fails() -> None:
        raise RuntimeError("plain")

    try:
        fails()
    except RuntimeError as error:
        assert not raised_in_compiled_code(error)

    compiled = torch.compile(lambda x: x + 1, backend=_failing_backend)
    with pytest.raises(RuntimeError) as caught:
        compiled(torch.ones(2))
    assert raised_in_compiled_code(caught.value)


def test_warm_up_runs_a_second_round_when_compiled_so_no_request_records_a_graph(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    generate_batch = tiny_engine.generate_batch

    def counted(items: list[Any]) -> list[Any]:
        batches.append(len(items))
        return generate_batch(items)

    monkeypatch.setattr(tiny_engine, "generate_batch", counted)
    warm_up(tiny_engine, [(64, 64)], [1, 2])
    assert batches == [1, 2], "eager needs one round"

    batches.clear()
    tiny_engine.models.base.vae.decoder.compile(backend="eager")
    warm_up(tiny_engine, [(64, 64)], [1, 2])
    # After batch 2, dynamo's newest graph serves batch 1 too: batch 1 again records its graph at start-up.
    assert batches == [1, 2, 1, 2]


def test_after_replace_thread_calls_run_on_a_new_thread_and_queued_ones_finish_on_the_old() -> None:
    gpu = GpuThread()
    release = threading.Event()
    first = gpu.run(threading.get_ident)
    slow_result: list[int] = []

    def slow() -> int:
        release.wait(10)
        return threading.get_ident()

    caller = threading.Thread(target=lambda: slow_result.append(gpu.run(slow)))
    caller.start()
    while gpu.ident is None:
        pass
    gpu.replace_thread()
    second = gpu.run(threading.get_ident)  # does not wait behind the old thread's call
    release.set()
    caller.join(10)

    assert slow_result == [first], "a call queued before the replacement ran elsewhere"
    assert second != first
    gpu.close()
    with pytest.raises(RuntimeError, match="closed"):
        gpu.run(threading.get_ident)
