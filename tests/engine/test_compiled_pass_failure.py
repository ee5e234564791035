"""A compiled pass that fails inside torch.compile's machinery is served eager, and the work is still done.

On an H200 a CUDA-graph capture failed (cuDNN timing a convolution inside the capture, run 27 in
docs/benchmarks.md) and left its thread's allocator recording into the graph's pool, so every later pass failed
too. These tests make a compiled module fail for real (a torch.compile backend that fails, as inductor does when
it cannot compile), on the CPU, and check what the engine does about it. Also here: the warm-up's second round,
which records the CUDA graphs the first round only warmed, and the GPU thread's replacement.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from dynamo_reset import reset_dynamo

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.engine import BatchItem
from imagesmith.engine.fast import (
    STOPPED_COMPILING,
    compiled_modules,
    raised_in_compiled_code,
    records_cuda_graphs,
    warm_up,
)
from imagesmith.engine.gpu_thread import GpuThread
from imagesmith.engine.progress import CancelToken, GenerationCanceled, ProgressEvent
from imagesmith.schemas import GenerationRequest


def _request(seed: int) -> GenerationRequest:
    return GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=4, seed=seed)


def _failing_backend(graph: Any, example_inputs: Any) -> Any:
    """A compiler that fails, as inductor does on a card or graph it cannot handle."""
    raise RuntimeError("FIND was unable to find an engine to execute this computation")


@pytest.fixture
def engine(tiny_settings: Settings) -> Iterator[Engine]:
    """An engine of its own (the tests change its levers and thread); the tiny models are shared by every
    engine in the process, so they are left uncompiled and dynamo's caches cleared."""
    # Without the empty-negative shortcut: with it the warm-up runs each shape twice (test_empty_negative.py).
    engine = Engine.start(tiny_settings.with_changes(empty_negative_shortcut=False))
    yield engine
    for module in compiled_modules(engine):
        module._compiled_call_impl = None
    reset_dynamo()


def _pixels(engine: Engine, seed: int) -> np.ndarray:
    return np.asarray(engine.generate(_request(seed)).images[0])


def _compile(engine: Engine, module: Any, backend: Any) -> None:
    module.compile(backend=backend)
    engine.levers.append("torch.compile(mode=reduce-overhead) UNets + VAE decoder")


def test_a_failing_compiled_module_falls_back_to_eager_and_the_pass_is_done(engine: Engine) -> None:
    eager_pixels = _pixels(engine, 7)
    decoder = engine.models.base.vae.decoder
    _compile(engine, decoder, _failing_backend)
    engine.records_cuda_graphs = True
    engine.levers.append(STOPPED_COMPILING)  # what the service's warm-up adds (it would compile nothing here)
    assert compiled_modules(engine) == [decoder]
    thread_before = engine._gpu.thread

    pixels = _pixels(engine, 7)  # the compiled decoder fails; the pass runs again, eager

    np.testing.assert_array_equal(pixels, eager_pixels)
    assert compiled_modules(engine) == [] and not engine.records_cuda_graphs
    assert engine.levers[-1] == "torch.compile failed, eager instead (BackendCompilerFailed)"
    assert not any(lever.startswith("torch.compile(") for lever in engine.levers)
    assert STOPPED_COMPILING not in engine.levers  # nothing compiled is left to stop
    # A new GPU thread: the failed one's per-thread CUDA state is not to be trusted.
    assert engine._gpu.thread is not None and engine._gpu.thread is not thread_before
    np.testing.assert_array_equal(_pixels(engine, 8), _pixels(engine, 8))


def test_a_failing_compiled_refiner_still_gives_a_refined_image(engine: Engine) -> None:
    """The refiner's own failures fall back to the base's picture; a compile failure there must not make
    every later image unrefined while compile stays on."""
    eager = engine.generate(_request(3))
    _compile(engine, engine.models.refiner.unet, _failing_backend)

    result = engine.generate(_request(3))

    assert result.metadata.refined, result.metadata
    np.testing.assert_array_equal(np.asarray(result.images[0]), np.asarray(eager.images[0]))
    assert compiled_modules(engine) == []


def test_the_retried_pass_still_honours_a_cancel(engine: Engine) -> None:
    """The eager retry goes through the same handling as any pass: a cancel during it ends the job canceled."""
    _compile(engine, engine.models.base.vae.decoder, _failing_backend)  # fails after every denoising step
    events: list[ProgressEvent] = []
    cancel = CancelToken()

    def heard(event: ProgressEvent) -> None:
        events.append(event)
        if any(seen.stage == "refine" for seen in events) and (event.stage, event.step) == ("base", 2):
            cancel.cancel()  # the second step of the retry

    (outcome,) = engine.generate_batch([BatchItem(_request(5), heard, cancel)])
    assert isinstance(outcome, GenerationCanceled)  # an outcome, as for any canceled pass, not an exception
    stages = [(event.stage, event.step) for event in events]
    # The compiled decode started (and was heard starting) before it failed; the retry starts over.
    assert stages == [
        ("base", 1),
        ("base", 2),
        ("base", 3),
        ("refine", 1),
        ("decode", 0),
        ("base", 1),
        ("base", 2),
    ]


def test_an_error_outside_compiled_code_is_not_taken_for_a_compile_failure(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = engine.models.base.vae.decoder
    _compile(engine, decoder, "eager")  # compiled, and working

    def broken_forward(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug in the model code")

    monkeypatch.setattr(engine.models.base.unet, "forward", broken_forward)
    with pytest.raises(ValueError, match="a bug in the model code"):
        engine.generate(_request(1))
    assert compiled_modules(engine) == [decoder], "an unrelated error turned compile off"


def test_raised_in_compiled_code_looks_at_where_the_error_came_from() -> None:
    def fails() -> None:
        raise RuntimeError("plain")

    with pytest.raises(RuntimeError) as plain:
        fails()
    assert not raised_in_compiled_code(plain.value)

    # The model's own code failing inside a compiled module: only dynamo's call wrapper is on the way.
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                raise ValueError("the model's own bug")
            return x

    broken = Broken()
    broken.compile(backend="eager")
    with pytest.raises(ValueError) as in_model:
        broken(torch.ones(2))
    assert not raised_in_compiled_code(in_model.value)

    failing = torch.compile(lambda x: x + 1, backend=_failing_backend)
    with pytest.raises(Exception) as compiling:
        failing(torch.ones(2))
    assert raised_in_compiled_code(compiling.value)

    # Re-raised by code outside the machinery, with the compile failure as its cause.
    try:
        try:
            failing(torch.ones(3))
        except Exception as error:
            raise RuntimeError("the pass failed") from error
    except RuntimeError as wrapped:
        assert raised_in_compiled_code(wrapped)
    reset_dynamo()


def test_warm_up_records_a_cuda_graph_for_every_batch_size_so_no_request_has_to(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    warn_limits: list[int | None] = []
    generate_batch = engine.generate_batch

    def counted(items: list[Any]) -> list[Any]:
        batches.append(len(items))
        warn_limits.append(torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit)
        return generate_batch(items)

    monkeypatch.setattr(engine, "generate_batch", counted)
    warm_up(engine, [(64, 64)], [1, 4])
    assert batches == [1, 4], "eager: one round"

    batches.clear()
    engine.models.base.vae.decoder.compile(backend="eager")
    warm_up(engine, [(64, 64)], [1, 4])
    assert batches == [1, 4], "compiled without CUDA graphs: nothing to record"

    batches.clear()
    engine.records_cuda_graphs = True  # as Engine.start sets it for reduce-overhead
    heard: list[str] = []
    # Inductor's own patch, not monkeypatch: torch 2.11's config hides a key that monkeypatch's undo deletes,
    # and every later compile in the process then failed reading it.
    with torch._inductor.config.patch({"triton.cudagraph_dynamic_shape_warn_limit": 2}):
        warm_up(engine, [(64, 64)], [1, 4], heard.append)
        # The graphs recorded on purpose do not trip torch's "too many CUDAGraphs" warning, and the limit is back
        # afterwards (inductor's config is part of its compile cache's key).
        assert warn_limits[-6:] == [2, 2, 4, 4, 4, 4]
        assert torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit == 2
    # Then every size the worker can form gets its graph recorded now, batch 1 included.
    assert batches == [1, 4, 1, 2, 3, 4]
    assert "warm-up, recording CUDA graphs, 4 of 4 (64x64, batch 4)" in heard


def test_only_applied_cuda_graph_modes_record_graphs() -> None:
    applied = ["fused QKV", "torch.compile(mode=reduce-overhead) UNets + VAE decoder"]
    assert records_cuda_graphs(Settings(compile="reduce-overhead"), applied)
    assert records_cuda_graphs(Settings(compile="max-autotune"), applied)
    assert not records_cuda_graphs(Settings(compile="default"), applied)
    assert not records_cuda_graphs(Settings(compile="max-autotune-no-cudagraphs"), applied)
    # Compile skipped (offloaded weights): nothing compiled, nothing recorded.
    assert not records_cuda_graphs(Settings(compile="reduce-overhead"), ["fused QKV"])


def test_replace_thread_moves_the_waiting_calls_and_never_runs_two_at_once() -> None:
    gpu = GpuThread()
    inside = threading.Event()
    release = threading.Event()
    running = 0
    most_at_once = 0
    lock = threading.Lock()

    def call(hold: bool = False) -> threading.Thread:
        nonlocal running, most_at_once
        with lock:
            running += 1
            most_at_once = max(most_at_once, running)
        if hold:
            inside.set()
            release.wait(10)
        with lock:
            running -= 1
        return threading.current_thread()

    first = gpu.run(call)
    results: dict[str, threading.Thread] = {}
    holder = threading.Thread(target=lambda: results.update(held=gpu.run(lambda: call(hold=True))))
    holder.start()
    inside.wait(10)  # the old thread is inside a call
    waiter = threading.Thread(target=lambda: results.update(waiting=gpu.run(call)))
    waiter.start()
    while gpu._calls.qsize() == 0:  # queued behind the held call
        pass
    gpu.replace_thread()
    release.set()
    holder.join(10)
    waiter.join(10)
    after = gpu.run(call)

    assert results["held"] is first, "the call in progress moved"
    assert results["waiting"] is not first and results["waiting"] is after, "the waiting call did not move"
    assert most_at_once == 1
    assert not first.is_alive()
    gpu.close()
    with pytest.raises(RuntimeError, match="closed"):
        gpu.run(threading.current_thread)


def test_a_pass_started_from_a_replaced_thread_is_still_refused() -> None:
    gpu = GpuThread()
    outcome: list[BaseException] = []
    go = threading.Event()

    def nested() -> None:
        go.wait(10)
        try:
            gpu.run(lambda: None)
        except RuntimeError as error:
            outcome.append(error)

    starter = threading.Thread(target=lambda: gpu.run(nested))
    starter.start()
    while gpu.thread is None:
        pass
    gpu.replace_thread()  # the nested call now comes from the old thread
    go.set()
    starter.join(10)
    assert outcome and "cannot start another pass" in str(outcome[0])
    gpu.close()


def test_a_compile_cut_short_by_a_stop_is_not_served_eager(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The process exits (or the engine closes) while a compiled pass compiles: the GPU thread is closed under
    it and the compile fails. That is no sign the graphs are broken: the error goes to the caller as it is, with
    no fall-back to eager (logged as an ERROR) and no retry on a thread that no longer takes calls."""
    decoder = engine.models.base.vae.decoder

    def stopped_mid_compile(graph: Any, example_inputs: Any) -> Any:
        engine._gpu.stop_for_exit()  # what the exit guard does while the compile runs
        raise RuntimeError("compile interrupted")

    _compile(engine, decoder, stopped_mid_compile)
    with caplog.at_level("WARNING"), pytest.raises(Exception, match="compile interrupted"):
        engine.generate(_request(5))
    assert compiled_modules(engine) == [decoder]  # not given up
    assert not any(lever.startswith("torch.compile failed") for lever in engine.levers)
    assert "a compiled pass failed" not in caplog.text
