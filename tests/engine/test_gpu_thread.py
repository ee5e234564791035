"""Every pass of an engine runs on its one GPU thread, whoever calls it.

torch's `reduce-overhead` CUDA graphs live in a per-thread tree: the service warmed up on its loading thread and
generated on its worker thread, and on torch 2.11 every request then failed (an AssertionError inside
cudagraph_trees, runs 25-26 in docs/benchmarks.md). CUDA graphs need a GPU, so the GPU test in tests/gpu runs
that case for real; these tests pin down the thread discipline that fixes it, on the CPU.
"""

from __future__ import annotations

import logging
import threading

import pytest

from imagesmith.engine import Engine
from imagesmith.engine.fast import warm_up
from imagesmith.engine.gpu_thread import GpuThread, ensure_cudagraph_tree_state
from imagesmith.logs import JobIdFilter, current_job
from imagesmith.schemas import GenerationRequest


def _request(seed: int) -> GenerationRequest:
    return GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=4, seed=seed)


def test_warm_up_and_every_generation_run_on_one_thread_whoever_calls(tiny_engine: Engine) -> None:
    seen: set[int] = set()

    def note(_event: object) -> None:
        seen.add(threading.get_ident())

    callers: list[int] = []

    def from_a_thread(call: object) -> None:
        def body() -> None:
            callers.append(threading.get_ident())
            call()  # type: ignore[operator]

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()

    # As the service does it: warm-up on the loading thread, requests on the worker thread.
    from_a_thread(lambda: warm_up(tiny_engine, [(64, 64)], [1, 2]))
    from_a_thread(lambda: tiny_engine.generate(_request(1), on_progress=note))
    from_a_thread(lambda: tiny_engine.generate(_request(2), on_progress=note))
    tiny_engine.generate(_request(3), on_progress=note)  # and from this thread

    assert len(seen) == 1, "passes ran on several threads"
    (gpu_thread,) = seen
    assert gpu_thread == tiny_engine._gpu.ident
    assert gpu_thread not in {*callers, threading.get_ident()}


def test_log_lines_written_on_the_gpu_thread_carry_the_callers_job(
    tiny_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(JobIdFilter())
    token = current_job.set("job-42")
    try:
        with caplog.at_level(logging.INFO, logger="imagesmith.engine.engine"):
            tiny_engine.generate(_request(5))
    finally:
        current_job.reset(token)
    generating = [r for r in caplog.records if r.getMessage().startswith("generating")]
    assert generating and all(getattr(r, "job_id", None) == "job-42" for r in generating)


def test_an_error_reaches_the_caller_and_the_thread_goes_on() -> None:
    gpu = GpuThread()

    def broken() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        gpu.run(broken)
    assert gpu.run(lambda: threading.get_ident()) == gpu.ident


def test_a_call_made_on_the_gpu_thread_runs_at_once() -> None:
    gpu = GpuThread()
    assert gpu.run(lambda: gpu.run(lambda: 7)) == 7  # queueing it would wait on itself forever


def test_a_thread_that_did_not_import_inductors_graph_trees_gets_their_state() -> None:
    import torch
    from torch._inductor import cudagraph_trees

    found: dict[str, bool] = {}

    def fresh_thread() -> None:
        found["before"] = hasattr(cudagraph_trees.local, "tree_manager_containers")
        ensure_cudagraph_tree_state()
        found["after"] = hasattr(cudagraph_trees.local, "tree_manager_containers")
        found["stashed"] = torch._C._is_key_in_tls("tree_manager_containers")
        found["locks"] = hasattr(cudagraph_trees.local, "tree_manager_locks")

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert found == {"before": False, "after": True, "stashed": True, "locks": True}
