"""engine/size_routing.py: warmed-up sizes on static graphs of their own, every other size on one dynamic graph."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dynamo_reset import reset_dynamo
from graph_recording import GraphRecording, TwoConvolutions, engine_routed_and_recording

from imagesmith.engine.size_routing import SizeRoutedCall, latent_size_of_image


def routed_with_recording(module: torch.nn.Module) -> tuple[SizeRoutedCall, list[bool], list[bool]]:
    """A routed call whose graphs run as traced; per graph compiled and per graph run, whether its sizes are
    symbolic."""
    recording = GraphRecording()
    options = {"fullgraph": True, "backend": recording.backend}
    return SizeRoutedCall(module._call_impl, options), recording.compiled, recording.ran


def test_a_warmed_up_size_stays_on_its_static_graph_after_other_sizes() -> None:
    module = TwoConvolutions().eval()
    routed, compiled, ran = routed_with_recording(module)
    routed.keep_static((8, 8))
    sizes = [(8, 8), (6, 10), (12, 6), (10, 14), (8, 8)]
    reset_dynamo()
    try:
        with torch.no_grad():
            for height, width in sizes:
                sample = torch.randn(1, 4, height, width)
                torch.testing.assert_close(routed(sample), module(sample))
    finally:
        reset_dynamo()
    assert ran == [False, True, True, True, False]
    assert compiled == [False, True]  # the warmed size's graph, then one for every other size


def test_each_warmed_up_size_gets_a_static_graph_of_its_own() -> None:
    """Plain compile would make the second size's graph dynamic and move the first size onto it."""
    module = TwoConvolutions().eval()
    routed, compiled, ran = routed_with_recording(module)
    for size in [(8, 8), (6, 10)]:
        routed.keep_static(size)
    reset_dynamo()
    try:
        with torch.no_grad():
            for height, width in [(8, 8), (6, 10), (8, 8), (6, 10)]:
                routed(torch.randn(1, 4, height, width))
    finally:
        reset_dynamo()
    assert compiled == [False, False] and ran == [False] * 4


def test_the_latents_of_an_image_size() -> None:
    assert latent_size_of_image(1216, 832, 8) == (104, 152)  # (height, width), as the pipelines make them


def test_each_route_keeps_its_graphs_on_a_code_object_of_its_own() -> None:
    """Torch 2.11 (the GPU machine's) does not guard on static marks: with one code object for both routes, a
    warmed-up size ran the dynamic graph compiled for another size (run 83). Apart, the static entry holds
    only static graphs, whatever torch's guards are."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    module = TwoConvolutions().eval()
    routed, compiled, _ = routed_with_recording(module)
    routed.keep_static((8, 8))
    assert routed.static_entry.__code__ is not routed.any_size_entry.__code__
    reset_dynamo()
    try:
        with torch.no_grad():
            for height, width in [(6, 10), (12, 6), (8, 8)]:  # another size first, as in run 83
                routed(torch.randn(1, 4, height, width))
        static_graphs = len(_debug_get_cache_entry_list(routed.static_entry))
        any_size_graphs = len(_debug_get_cache_entry_list(routed.any_size_entry))
    finally:
        reset_dynamo()
    assert (static_graphs, any_size_graphs) == (1, 1)
    assert compiled == [True, False]


def test_the_size_outside_the_warm_up_sizes_is_close_oblong_and_new() -> None:
    from imagesmith.engine.fast import size_outside

    assert size_outside([(1024, 1024)]) == (1024, 960)  # 120x128 latents: below the decoder's attention bound
    assert size_outside([(1024, 1024), (1024, 960)]) == (1024, 896)
    assert size_outside([(64, 64)]) == (64, 128)  # the smallest side: larger instead
    assert size_outside([(960, 1024)]) == (960, 896)  # not square
    assert size_outside([(1000, 1000)]) == (1000, 960)  # a multiple of 64 px (latents that divide by 4)
    # Next to the smallest size, not the first: one above the decoder's attention bound would put the shared
    # decoder graph on the other attention route, which the usual sizes' guards refuse.
    assert size_outside([(1536, 1536), (1024, 1024)]) == (1024, 960)


def test_warming_up_any_size_leaves_no_compile_for_requests_at_new_sizes(tiny_settings: Any) -> None:
    """IMAGESMITH_WARMUP_ANY_SIZE: after the warm-up, one-image and batched requests at sizes it never ran
    compile nothing (with guidance; a pass of one row per image is a shape of its own)."""
    from imagesmith.engine import Engine
    from imagesmith.engine.engine import BatchItem
    from imagesmith.engine.fast import warm_up
    from imagesmith.schemas import GenerationRequest

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False))
    heard: list[str] = []
    with engine_routed_and_recording(engine) as recording:
        graphs = recording.compiled
        warm_up(engine, [(64, 64)], [1, 4], heard.append, any_size=True)
        after_warm_up = len(graphs)
        # Sizes the warm-up did not run (64x128 it ran, for the other sizes), in multiples of 32 px (latents whose
        # sides divide by 4, or the UNet's upsampling takes another branch: a graph of their own). Each under
        # 160 latent positions, past which torch's CPU convolution guards a size of its own in the tiny decoder.
        for sizes in [[(128, 64)], [(64, 96)], [(96, 96)], [(96, 64), (96, 64)]]:
            items = [
                BatchItem(
                    GenerationRequest(
                        prompt="a lighthouse", width=width, height=height, num_inference_steps=4, seed=1
                    ),
                    None,
                )
                for width, height in sizes
            ]
            for outcome in engine.generate_batch(items):
                assert not isinstance(outcome, BaseException)
    assert len(graphs) == after_warm_up
    assert not any("eager instead" in lever for lever in engine.levers)
    assert any("64x128" in line and "every other size" in line for line in heard)


def test_a_failed_any_size_compile_keeps_the_warmed_up_sizes_compiled(
    tiny_settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """IMAGESMITH_WARMUP_ANY_SIZE: if the shared graphs fail to compile, the warm-up sizes keep their static
    graphs and other sizes run uncompiled, where the whole engine used to turn eager (every request ~1.75x
    slower for a lever that serves a few). Nothing retries the failed compile on a request."""
    from imagesmith.engine import Engine
    from imagesmith.engine.fast import warm_up_or_fall_back_to_eager
    from imagesmith.schemas import GenerationRequest
    from imagesmith.uncompiled_calls import uncompiled_calls

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False))
    engine.levers.append("torch.compile(mode=default) UNets + VAE decoder")
    with engine_routed_and_recording(engine) as recording:
        recording.fails_on_symbolic_sides = True
        engine.generate(GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=2))
        thread = (
            engine._gpu.ident
        )  # kept: the static graphs' CUDA graphs stay on the thread they were made on
        warm_up_or_fall_back_to_eager(engine, [(64, 64)], [1], any_size=True)
        assert engine.models.base.unet._compiled_call_impl is not None
        assert not any("eager instead" in lever for lever in engine.levers)
        assert any("sizes not warmed up failed (BackendCompilerFailed)" in lever for lever in engine.levers)
        assert "the warmed-up sizes keep their compiled graphs" in caplog.text
        compiled_after_warm_up, ran_after_warm_up = len(recording.compiled), len(recording.ran)
        before = dict(uncompiled_calls())
        request = GenerationRequest(
            prompt="a lighthouse", width=128, height=64, num_inference_steps=4, seed=1
        )
        assert engine.generate(request).images
        assert len(recording.compiled) == compiled_after_warm_up  # no retry on the request
        assert len(recording.ran) == ran_after_warm_up  # every call uncompiled
        assert uncompiled_calls().get("decode", 0) > before.get("decode", 0)
        assert engine.generate(request.model_copy(update={"width": 64})).images
        assert len(recording.ran) > ran_after_warm_up  # the warmed-up size on its static graphs
        assert len(recording.compiled) == compiled_after_warm_up
        assert engine._gpu.ident == thread


def test_a_failure_outside_the_shared_graphs_still_turns_the_engine_eager(tiny_settings: Any) -> None:
    """IMAGESMITH_COMPILE_DYNAMIC's UNets are not routed; the decoder is. A UNet compile failing at a new size
    is no failure of the shared graphs, though the size is not warmed up: giving those up would leave the UNet
    compiled, and the retry failed the same way (the review of session 37)."""

    from imagesmith.engine import Engine
    from imagesmith.engine.fast import route_decoder, warm_up_or_fall_back_to_eager
    from imagesmith.schemas import GenerationRequest

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False))
    engine.levers.append("torch.compile(mode=default) UNets + VAE decoder")
    unets = [engine.models.base.unet, engine.models.refiner.unet]
    decoder = engine.models.base.vae.decoder
    failing, recording = GraphRecording(fails_on_symbolic_sides=True), GraphRecording()
    reset_dynamo()
    try:
        for unet in unets:
            unet._compiled_call_impl = torch.compile(unet._call_impl, fullgraph=True, backend=failing.backend)
        route_decoder(decoder, {"fullgraph": True, "dynamic": None, "backend": recording.backend})
        warm_up_or_fall_back_to_eager(engine, [(64, 64)], [1])
        assert unets[0]._compiled_call_impl is not None
        request = GenerationRequest(
            prompt="a lighthouse", width=128, height=64, num_inference_steps=4, seed=1
        )
        assert engine.generate(request).images  # the UNet's dynamic recompile fails; the retry runs eager
        assert unets[0]._compiled_call_impl is None and decoder._compiled_call_impl is None
        assert any(lever.startswith("torch.compile failed, eager instead") for lever in engine.levers)
        assert not any("sizes not warmed up failed" in lever for lever in engine.levers)
    finally:
        for module in [*unets, decoder]:
            module._compiled_call_impl = None
        reset_dynamo()


def test_a_failure_is_judged_by_its_own_pass(tiny_settings: Any) -> None:
    """A call on an any-size graph that raised in an earlier pass, where the pass handled it (an out-of-memory
    error, the refiner's fallback), must not make a later compile failure at a warmed-up size look like the
    shared graphs' (which gave them up and failed once more before going eager)."""
    from imagesmith.engine import Engine
    from imagesmith.engine.fast import warm_up_or_fall_back_to_eager
    from imagesmith.schemas import GenerationRequest

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False))
    engine.levers.append("torch.compile(mode=default) UNets + VAE decoder")
    with engine_routed_and_recording(engine):
        warm_up_or_fall_back_to_eager(engine, [(64, 64)], [1])
        routed = engine.models.base.unet._compiled_call_impl
        routed.single.any_size_raised = True  # left by an earlier pass
        failures: list[int] = []

        def failing_static_graph(*args: Any, **kwargs: Any) -> Any:
            failures.append(1)
            raise torch._dynamo.exc.InternalTorchDynamoError("simulated")

        routed.single.static = failing_static_graph
        request = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=4, seed=1)
        assert engine.generate(request).images
        assert failures == [1]  # eager after the first failure
        assert any(lever.startswith("torch.compile failed, eager instead") for lever in engine.levers)


@pytest.mark.parametrize(
    ("sizes", "asked"), [("64x64", True), ("64x64", False), ("64x64,64x128", False), ("64x64,64x128", True)]
)
def test_the_service_warms_up_any_size_when_the_setting_asks(
    tiny_settings: Any, tiny_engine: Any, sizes: str, asked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only when asked: two warm-up sizes no longer turn it on (run 87: the shared graphs compile 3.4x longer)."""
    from imagesmith.engine import fast
    from imagesmith.sources.base import SourceState
    from imagesmith.sources.generate import GenerateSource

    heard: dict[str, Any] = {}

    def warm_up(
        engine: Any, sizes: list[tuple[int, int]], batches: list[int], *args: Any, **kwargs: Any
    ) -> float:
        heard.update(sizes=sizes, **kwargs)
        return 0.0

    monkeypatch.setattr(fast, "warm_up_or_fall_back_to_eager", warm_up)
    settings = tiny_settings.with_changes(warmup_sizes=sizes, warmup_any_size=asked)
    source = GenerateSource(settings, factory=lambda _: tiny_engine)
    source.start_loading().join(30)
    assert source.status().state is SourceState.READY
    assert heard == {"sizes": settings.warmup_size_list(), "any_size": asked}


def test_without_compiled_graphs_there_is_nothing_to_warm_up_for_other_sizes(tiny_engine: Any) -> None:
    from imagesmith.engine.fast import warm_up

    heard: list[str] = []
    warm_up(tiny_engine, [(64, 64)], [1], heard.append, any_size=True)  # the CPU's eager engine
    assert heard and all("warm-up 1 of 1 (64x64, batch 1)" in line for line in heard)


def test_without_a_warm_up_the_first_size_seen_keeps_a_static_graph() -> None:
    """A one-shot command, a server without warm-up, a benchmark's own passes: as dynamo's own first graph."""
    module = TwoConvolutions().eval()
    routed, compiled, ran = routed_with_recording(module)
    reset_dynamo()
    try:
        with torch.no_grad():
            for height, width in [(8, 12), (6, 10), (8, 12)]:
                routed(torch.randn(1, 4, height, width))
    finally:
        reset_dynamo()
    assert ran == [False, True, False] and compiled == [False, True]


def test_the_one_image_and_batched_graphs_keep_their_graphs_apart(tiny_settings: Any) -> None:
    """Torch 2.11 ran a one-image pass after a batched one on the batch-dynamic graph when both hung on one code
    object (CI's torch 2.13 guards on the static mark, so only the cache entries show it here)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from unet_call import unet_inputs

    from imagesmith.engine import Engine
    from imagesmith.engine.batch_routing import BatchRoutedCall

    unet = Engine.start(tiny_settings).models.base.unet
    routed = BatchRoutedCall(unet._call_impl, {"fullgraph": True, "dynamic": None, "backend": "eager"})
    routed.keep_static((16, 16))  # unet_inputs' latents
    single, batched = routed.single, routed.batched
    assert isinstance(single, SizeRoutedCall) and isinstance(batched, SizeRoutedCall)
    assert single.static_entry.__code__ is not batched.static_entry.__code__
    reset_dynamo()
    try:
        with torch.no_grad():
            for rows in (6, 2):
                args, kwargs = unet_inputs(unet.config, rows)
                routed(*args, **kwargs)
        held = [len(_debug_get_cache_entry_list(call.static_entry)) for call in (single, batched)]
    finally:
        reset_dynamo()
    assert held == [1, 1]


def test_any_size_is_warmed_up_when_asked_or_compiled_dynamic_not_for_two_sizes() -> None:
    from imagesmith.config import Settings

    assert not Settings().warms_up_any_size()
    assert Settings(warmup_any_size=True).warms_up_any_size()
    assert not Settings(warmup_sizes="1024x1024,1216x832").warms_up_any_size()
    # Its UNet graphs, compiled at the square warm-up size, guard height == width: an oblong pass warms them up.
    assert Settings(compile_dynamic=True).warms_up_any_size()


def test_only_cuda_graph_recording_and_replay_count_as_cuda_graph_failures() -> None:
    """A CUDA-graph mode's first, eager run of a graph passes through cudagraph_trees too (CUDAWarmupNode): a
    failure there leaves no CUDA graph in doubt, so the shared graphs alone may be given up."""
    from imagesmith.engine.fast import raised_in_cuda_graph_code

    source = (
        "class CUDAWarmupNode:\n    def run(self):\n        raise RuntimeError('warm-up run')\n"
        "class CUDAGraphNode:\n    def run(self):\n        raise RuntimeError('replay')\n"
    )
    fake_module: dict[str, Any] = {"__name__": "torch._inductor.cudagraph_trees"}
    exec(compile(source, "cudagraph_trees.py", "exec"), fake_module)
    verdicts = []
    for node in (fake_module["CUDAWarmupNode"](), fake_module["CUDAGraphNode"]()):
        try:
            node.run()
        except RuntimeError as error:
            verdicts.append(raised_in_cuda_graph_code(error))
    assert verdicts == [False, True]
