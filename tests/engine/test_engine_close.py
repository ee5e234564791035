"""Engine.close(): a library user gets the engine's memory back without ending the process, and a closed engine
says so instead of failing somewhere inside the pipeline."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.schemas import GenerationRequest


def small_request() -> GenerationRequest:
    return GenerationRequest(prompt="a red bicycle", width=64, height=64, num_inference_steps=2, seed=3)


def test_close_lets_go_of_the_models_and_refuses_later_passes(tiny_settings: Settings) -> None:
    engine = Engine.start(tiny_settings)
    engine.generate(small_request())  # the GPU thread, the prompt cache and the buffers are in use
    gpu_thread = engine._gpu.thread
    assert gpu_thread is not None and gpu_thread.is_alive()
    base_unet = weakref.ref(engine.models.base.unet)
    refiner_unet = weakref.ref(engine.models.refiner.unet)

    engine.close()

    assert not gpu_thread.is_alive()
    gc.collect()
    assert base_unet() is None and refiner_unet() is None, "a closed engine still holds its models"
    with pytest.raises(RuntimeError, match=r"engine is closed.*Engine\.start"):
        engine.generate(small_request())
    with pytest.raises(RuntimeError, match="engine is closed"):
        engine.planned_steps(small_request())
    assert engine.refiner_status == "closed"
    engine.close()  # a second close does nothing


def test_with_block_closes_the_engine_after_a_pass_another_thread_queued(tiny_settings: Settings) -> None:
    results: list[object] = []
    with Engine.start(tiny_settings) as engine:
        # A pass from another thread that is running or queued when the block ends still finishes.
        worker = threading.Thread(target=lambda: results.append(engine.generate(small_request())))
        worker.start()
        while engine._gpu.thread is None:
            time.sleep(0.01)
    worker.join(timeout=120)
    assert len(results) == 1 and getattr(results[0], "images", None), results
    assert engine.closed
    with pytest.raises(RuntimeError, match="engine is closed"):
        engine.generate(small_request())


def test_a_pass_asked_for_while_close_waits_is_refused_by_name(tiny_settings: Settings) -> None:
    """close() waits for the pass running; a pass asked for meanwhile got the GPU thread's "this engine's GPU
    thread is closed", which does not say what to do."""
    engine = Engine.start(tiny_settings)
    entered, release = threading.Event(), threading.Event()

    def hold(event: object) -> None:
        entered.set()
        release.wait(60)

    running = threading.Thread(target=lambda: engine.generate(small_request(), on_progress=hold))
    running.start()
    assert entered.wait(60)
    closing = threading.Thread(target=engine.close)
    closing.start()
    while not engine._closing:
        time.sleep(0.01)
    try:
        with pytest.raises(RuntimeError, match=r"engine is closed.*Engine\.start"):
            engine.generate(small_request())
    finally:
        release.set()
        running.join(60)
        closing.join(60)
    assert engine.closed
