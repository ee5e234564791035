"""After the service's warm-up nothing compiles on a request (fast.stop_compiling_on_requests): shapes the warm-up
did not run go uncompiled, unless IMAGESMITH_COMPILE_ON_REQUEST=true."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from dynamo_reset import reset_dynamo
from graph_recording import GraphRecording, TwoConvolutions, engine_routed_and_recording

from imagesmith.engine.size_routing import SizeRoutedCall
from imagesmith.uncompiled_calls import uncompiled_calls


@pytest.fixture
def fresh_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind of uncompiled call is logged once a process: not already by an earlier test."""
    from imagesmith.engine import size_routing

    monkeypatch.setattr(size_routing, "_SAID_UNCOMPILED", set())


def routing_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage() for record in caplog.records if record.name == "imagesmith.engine.size_routing"
    ]


def test_a_stopped_route_runs_a_size_without_a_graph_uncompiled(
    caplog: pytest.LogCaptureFixture, fresh_logs: None
) -> None:
    module = TwoConvolutions().eval()
    recording = GraphRecording()
    routed = SizeRoutedCall(
        module._call_impl, {"fullgraph": True, "backend": recording.backend}, label="decode"
    )
    routed.keep_static((8, 8))
    reset_dynamo()
    try:
        with torch.no_grad():
            routed(torch.randn(1, 4, 8, 8))  # the warm-up
            routed.stop_compiling()
            with caplog.at_level(logging.WARNING, logger="imagesmith.engine.size_routing"):
                for rows, height, width in [(1, 6, 10), (1, 6, 10), (1, 8, 8), (3, 8, 8), (3, 8, 8)]:
                    sample = torch.randn(rows, 4, height, width)
                    torch.testing.assert_close(routed(sample), module(sample))
    finally:
        reset_dynamo()
    assert recording.compiled == [False]  # the warmed-up size's graph only
    assert recording.ran == [False, False]  # the warm-up and the call at 8x8; the others ran uncompiled
    assert routing_warnings(caplog) == [
        "the warm-up compiled no decode graph for this size, latents 6x10 with 1 row(s) (a 80x48 image): it runs "
        "uncompiled (slower) rather than compile on a request. To compile it: list the size in "
        "IMAGESMITH_WARMUP_SIZES, or set IMAGESMITH_WARMUP_ANY_SIZE=true (every size) or "
        "IMAGESMITH_COMPILE_ON_REQUEST=true",
        # Three rows at the warmed-up size: the static graph's guards want one; dynamo names the failed guard. No
        # warm-up size would help: only compiling on the request does.
        "a decode call at latents 8x8 with 3 row(s) (a 64x64 image) missed its graphs' guards (tensor 'args[0]' "
        "size mismatch at index 0. expected 1, actual 3): it runs uncompiled (slower) rather than compile on a "
        "request. To compile it: IMAGESMITH_COMPILE_ON_REQUEST=true compiles such passes, on their first request",
    ]


def test_a_route_that_ran_before_the_stop_keeps_serving_new_sizes() -> None:
    """IMAGESMITH_WARMUP_ANY_SIZE's warm-up ran the any-size route: new sizes run its graph, compiled."""
    module = TwoConvolutions().eval()
    recording = GraphRecording()
    routed = SizeRoutedCall(module._call_impl, {"fullgraph": True, "backend": recording.backend})
    routed.keep_static((8, 8))
    reset_dynamo()
    try:
        with torch.no_grad():
            for height, width in [(8, 8), (8, 12)]:  # the warm-up: its size, then one outside it
                routed(torch.randn(1, 4, height, width))
            routed.stop_compiling()
            routed(torch.randn(1, 4, 12, 6))
    finally:
        reset_dynamo()
    assert recording.compiled == [False, True] and recording.ran == [False, True, True]


def generate(
    engine: Any,
    width: int,
    height: int,
    images: int = 1,
    guidance: float = 5.0,
    scheduler: str = "euler",
    steps: int = 4,
) -> np.ndarray:
    from imagesmith.schemas import GenerationRequest

    request = GenerationRequest(
        prompt="a lighthouse",
        width=width,
        height=height,
        num_images=images,
        guidance_scale=guidance,
        scheduler=scheduler,
        num_inference_steps=steps,
        seed=3,
    )
    return np.stack([np.asarray(image) for image in engine.generate(request).images])


# Shapes the warm-up (64x64, one image, with guidance) did not run: another size (the any-size routes), two
# images (the batched routes), guidance_scale 1 (one UNet row per image: a guard miss in the one-image graph).
REQUESTS = [(96, 64, 1, 5.0), (64, 64, 2, 5.0), (64, 64, 1, 1.0)]


# A one-image request on compiled graphs: one per UNet step (base and refiner; each scheduler here calls the UNet
# once a step) and the decode.
def graphs_run_by_a_request(steps: int = 4) -> int:
    return steps + 1


@pytest.mark.parametrize("stopped", [True, False])
def test_after_the_warm_up_requests_of_new_shapes_compile_nothing(
    tiny_settings: Any, stopped: bool, fresh_logs: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopped, each new shape runs uncompiled, with the image an eager engine makes, each kind logged once, and
    the warmed-up shape still runs its graphs; not stopped (IMAGESMITH_COMPILE_ON_REQUEST=true), each compiles."""
    from imagesmith.engine import Engine
    from imagesmith.engine.fast import STOPPED_COMPILING, stop_compiling_on_requests, warm_up

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False))
    eager = {shape: generate(engine, *shape) for shape in REQUESTS}
    with engine_routed_and_recording(engine) as recording, caplog.at_level(logging.WARNING):
        warm_up(engine, [(64, 64)], [1])
        after_warm_up = len(recording.compiled)
        if stopped:
            stop_compiling_on_requests(engine)
        calls_before = uncompiled_calls()
        compiled = {shape: generate(engine, *shape) for shape in REQUESTS}
        calls = {kind: count - calls_before.get(kind, 0) for kind, count in uncompiled_calls().items()}
        calls = {kind: count for kind, count in calls.items() if count}  # kinds counted by earlier tests only
        new_graphs = len(recording.compiled) - after_warm_up
        before = len(recording.ran)
        generate(engine, 64, 64)
        graphs_run_after = len(recording.ran) - before
    assert after_warm_up > 0
    assert graphs_run_after == graphs_run_by_a_request()  # the warmed-up shape, after the new ones
    warnings = routing_warnings(caplog)
    if stopped:
        assert new_graphs == 0
        assert STOPPED_COMPILING in engine.levers and not engine.compiles_on_request
        for shape in REQUESTS:
            np.testing.assert_array_equal(compiled[shape], eager[shape])
        assert any("no one_image graph for this size, latents 8x12" in line for line in warnings)
        assert any("no batched graph for this kind of pass at a warmed-up size" in line for line in warnings)
        assert any("a one_image call at latents 8x8 with 1 row(s)" in line for line in warnings)  # guidance 1
        assert len(warnings) == len(set(warnings))
        # /metrics' count, per UNet step (4 a request) and decode: the new size's steps and decode, the two-image
        # pass's batched steps, guidance 1's steps. The other two decodes fit the static graph (a row an image).
        assert calls == {"one_image": 4 + 4, "batched": 4, "decode": 1}
    else:
        assert new_graphs >= len(REQUESTS) and not warnings and not calls
    assert not any("eager instead" in lever for lever in engine.levers)
    assert torch._dynamo.eval_frame._stance.stance == "default"  # the passes' stance went with them


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "ddim", "unipc"])
def test_schedulers_with_integer_timesteps_run_the_warmed_up_graphs(
    tiny_settings: Any, scheduler: str
) -> None:
    """The warm-up runs Euler (float timesteps); these hand the UNet int64 timesteps, which the routing casts
    to float32: the warm-up's graphs serve them, with the eager engine's image."""
    from imagesmith.engine import Engine
    from imagesmith.engine.fast import stop_compiling_on_requests, warm_up

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False))
    steps = 8  # 4 would leave the refiner no step with these schedulers' timesteps
    eager = generate(engine, 64, 64, scheduler=scheduler, steps=steps)
    with engine_routed_and_recording(engine) as recording:
        warm_up(engine, [(64, 64)], [1])
        stop_compiling_on_requests(engine)
        graphs = len(recording.compiled)
        before = len(recording.ran)
        image = generate(engine, 64, 64, scheduler=scheduler, steps=steps)
        assert len(recording.compiled) == graphs
        assert len(recording.ran) - before == graphs_run_by_a_request(steps)
    np.testing.assert_array_equal(image, eager)


def test_modules_compiled_without_routing_do_not_compile_on_a_request_either(tiny_settings: Any) -> None:
    """IMAGESMITH_COMPILE_DYNAMIC's UNets keep Module.compile's own call, with no routing: the pass's
    "eager_on_recompile" stance runs their guard misses uncompiled."""
    from imagesmith.engine import Engine
    from imagesmith.engine.fast import stop_compiling_on_requests, warm_up

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False))
    recording = GraphRecording()
    unets = [engine.models.base.unet, engine.models.refiner.unet]
    reset_dynamo()
    try:
        for unet in unets:
            unet.compile(fullgraph=True, dynamic=True, backend=recording.backend)
        warm_up(engine, [(64, 64)], [1])
        stop_compiling_on_requests(engine)
        graphs = len(recording.compiled)
        generate(engine, 96, 64)  # oblong after a square warm-up: a guard miss (height == width)
        generate(engine, 64, 64, guidance=1.0)
        assert len(recording.compiled) == graphs > 0
    finally:
        for unet in unets:
            unet._compiled_call_impl = None
        reset_dynamo()
    assert torch._dynamo.eval_frame._stance.stance == "default"


def test_without_compiled_modules_there_is_nothing_to_stop(tiny_engine: Any) -> None:
    from imagesmith.engine.fast import stop_compiling_on_requests

    levers = list(tiny_engine.levers)
    stop_compiling_on_requests(tiny_engine)  # the CPU's eager engine
    assert tiny_engine.levers == levers and tiny_engine.compiles_on_request


@pytest.mark.parametrize("asked", [True, False])
def test_the_service_stops_compiling_after_its_warm_up_unless_asked_not_to(
    tiny_settings: Any, tiny_engine: Any, asked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagesmith.engine import fast
    from imagesmith.sources.base import SourceState
    from imagesmith.sources.generate import GenerateSource

    order: list[str] = []
    monkeypatch.setattr(
        fast, "warm_up_or_fall_back_to_eager", lambda *args, **kwargs: order.append("warm-up") or 0.0
    )
    monkeypatch.setattr(fast, "stop_compiling_on_requests", lambda engine: order.append("stop"))
    source = GenerateSource(
        tiny_settings.with_changes(compile_on_request=asked), factory=lambda _: tiny_engine
    )
    source.start_loading().join(30)
    assert source.status().state is SourceState.READY
    assert order == (["warm-up"] if asked else ["warm-up", "stop"])
