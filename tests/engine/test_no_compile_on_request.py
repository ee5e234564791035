"""After the service's warm-up nothing compiles on a request (fast.stop_compiling_on_requests): shapes the warm-up
did not run go uncompiled, unless IMAGESMITH_COMPILE_ON_REQUEST=true."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from graph_recording import GraphRecording, TwoConvolutions, engine_routed_and_counting

from imagesmith.engine.size_routing import SizeRoutedCall


def test_a_stopped_route_runs_a_size_without_a_graph_uncompiled(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagesmith.engine import size_routing

    monkeypatch.setattr(
        size_routing, "_SAID_UNCOMPILED", set()
    )  # said once a process: not by an earlier test
    module = TwoConvolutions().eval()
    recording = GraphRecording()
    routed = SizeRoutedCall(
        module._call_impl, {"fullgraph": True, "backend": recording.backend}, label="decode"
    )
    routed.keep_static((8, 8))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            routed(torch.randn(1, 4, 8, 8))  # the warm-up
            routed.stop_compiling()
            with caplog.at_level(logging.WARNING, logger="imagesmith.engine.size_routing"):
                for height, width in [(6, 10), (6, 10), (8, 8)]:
                    sample = torch.randn(1, 4, height, width)
                    torch.testing.assert_close(routed(sample), module(sample))
    finally:
        torch._dynamo.reset()
    assert recording.compiled == [False]  # the warmed-up size's graph only
    assert recording.ran == [False, False]  # the warm-up and the last call; 6x10 ran uncompiled
    warnings = [record.getMessage() for record in caplog.records if record.name.startswith("imagesmith")]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "no graph was warmed up for latents 6x10 (a 80x48 image with SDXL's VAE; decode,"
    )


def test_a_route_that_ran_before_the_stop_keeps_serving_new_sizes() -> None:
    """IMAGESMITH_WARMUP_ANY_SIZE's warm-up ran the any-size route: new sizes run its graph, compiled."""
    module = TwoConvolutions().eval()
    recording = GraphRecording()
    routed = SizeRoutedCall(module._call_impl, {"fullgraph": True, "backend": recording.backend})
    routed.keep_static((8, 8))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for height, width in [(8, 8), (8, 12)]:  # the warm-up: its size, then one outside it
                routed(torch.randn(1, 4, height, width))
            routed.stop_compiling()
            routed(torch.randn(1, 4, 12, 6))
    finally:
        torch._dynamo.reset()
    assert recording.compiled == [False, True] and recording.ran == [False, True, True]


def generate(engine: Any, width: int, height: int, images: int = 1, guidance: float = 5.0) -> np.ndarray:
    from imagesmith.schemas import GenerationRequest

    request = GenerationRequest(
        prompt="a lighthouse",
        width=width,
        height=height,
        num_images=images,
        guidance_scale=guidance,
        num_inference_steps=4,
        seed=3,
    )
    return np.stack([np.asarray(image) for image in engine.generate(request).images])


# Shapes the warm-up (64x64, one image, with guidance) did not run: another size (the any-size routes), two
# images (the batched routes), guidance_scale 1 (one UNet row per image: a guard miss in the one-image graph).
REQUESTS = [(96, 64, 1, 5.0), (64, 64, 2, 5.0), (64, 64, 1, 1.0)]


@pytest.mark.parametrize("stopped", [True, False])
def test_after_the_warm_up_requests_of_new_shapes_compile_nothing(tiny_settings: Any, stopped: bool) -> None:
    """Stopped, each new shape runs uncompiled, with the image an eager engine makes; not stopped
    (IMAGESMITH_COMPILE_ON_REQUEST=true), each compiles."""
    from imagesmith.engine import Engine
    from imagesmith.engine.fast import STOPPED_COMPILING, stop_compiling_on_requests, warm_up

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False))
    eager = {shape: generate(engine, *shape) for shape in REQUESTS}
    with engine_routed_and_counting(engine) as graphs:
        warm_up(engine, [(64, 64)], [1])
        after_warm_up = len(graphs)
        if stopped:
            stop_compiling_on_requests(engine)
        compiled = {shape: generate(engine, *shape) for shape in REQUESTS}
        new_graphs = len(graphs) - after_warm_up
        warmed_up_size_again = len(graphs)
        generate(engine, 64, 64)
        assert len(graphs) == warmed_up_size_again  # the warmed-up shape still runs its graphs
    assert after_warm_up > 0
    if stopped:
        assert new_graphs == 0
        assert STOPPED_COMPILING in engine.levers and not engine.compiles_on_request
        for shape in REQUESTS:
            np.testing.assert_array_equal(compiled[shape], eager[shape])
    else:
        assert new_graphs >= len(REQUESTS)
    assert not any("eager instead" in lever for lever in engine.levers)


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
