"""Speed levers change speed, not pictures: each exact lever gives the image the plain engine gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from dynamo_reset import reset_dynamo
from graph_recording import GraphRecording
from pydantic import ValidationError
from unet_call import unet_inputs

from imagesmith.config import Settings, settings_error_lines
from imagesmith.engine import Engine
from imagesmith.engine.batch_routing import BatchRoutedCall
from imagesmith.engine.fast import (
    apply_speed_levers,
    cudnn_benchmark_wanted,
    decoder_compile_mode,
    fuse_qkv_wanted,
)
from imagesmith.engine.hardware import DeviceInfo, plan_hardware
from imagesmith.engine.size_routing import SizeRoutedCall
from imagesmith.schemas import GenerationRequest

REQUEST = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=10, seed=21)


@pytest.mark.parametrize(
    ("changes", "wanted"),
    [
        ({}, False),  # eager keeps NCHW
        ({"compile": "reduce-overhead"}, True),  # static graphs copied NCHW weights on every call (run 89)
        ({"compile": "reduce-overhead", "warmup_any_size": True}, True),  # the shared graphs (run 88)
        ({"compile": "default"}, True),  # any compile mode
        ({"warmup_any_size": True}, False),  # uncompiled
        ({"compile": "reduce-overhead", "offload": "model"}, False),  # compile skipped
        ({"compile": "reduce-overhead", "channels_last": False}, False),  # as set
        ({"channels_last": True}, True),
    ],
)
def test_channels_last_follows_compile_unless_set(
    tiny_settings: Settings, changes: dict[str, Any], wanted: bool
) -> None:
    from imagesmith.engine.fast import channels_last_wanted

    gpu = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
    settings = tiny_settings.with_changes(**changes)
    assert channels_last_wanted(settings, plan_hardware(gpu, settings)) is wanted


def test_fused_qkv_gives_the_same_image_and_frees_the_unfused_weights(tiny_settings: Settings) -> None:
    no_shortcut = tiny_settings.with_changes(empty_negative_shortcut=False)  # its levers are counted
    plain = Engine.start(no_shortcut.with_changes(**{"fuse_qkv": False}))
    fused = Engine.start(
        no_shortcut.with_changes(**{"fuse_qkv": True, "channels_last": True, "encode_ahead": False})
    )
    assert fused.levers == ["fused QKV", "channels_last"]
    a = np.asarray(plain.generate(REQUEST).images[0]).astype(int)
    b = np.asarray(fused.generate(REQUEST).images[0]).astype(int)
    assert np.abs(a - b).max() <= 1  # the same products, summed in another order
    attention = [m for m in fused.models.base.unet.modules() if type(m).__name__ == "Attention"]
    assert attention and all(
        not hasattr(m, "to_k") and hasattr(m, "to_q" if m.is_cross_attention else "to_qkv") for m in attention
    )
    # No weight is held twice: diffusers alone would keep to_q/to_k/to_v beside the fused copies.
    for name in ("unet", "vae"):
        fused_count = sum(p.numel() for p in getattr(fused.models.base, name).parameters())
        assert fused_count == sum(p.numel() for p in getattr(plain.models.base, name).parameters())


def test_fusing_follows_compile_and_never_touches_offloaded_weights() -> None:
    gpu = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
    resident = plan_hardware(gpu, Settings())
    offloaded = plan_hardware(gpu, Settings(offload="model"))
    assert not fuse_qkv_wanted(Settings(), resident)
    assert fuse_qkv_wanted(Settings(compile="default"), resident)
    assert not fuse_qkv_wanted(Settings(compile="default", fuse_qkv=True), offloaded)


def test_cudnn_benchmark_follows_compile_on_cuda_only_and_not_with_cuda_graphs() -> None:
    gpu = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
    plan = plan_hardware(gpu, Settings())
    assert not cudnn_benchmark_wanted(Settings(), plan)
    assert cudnn_benchmark_wanted(Settings(compile="default"), plan)
    assert cudnn_benchmark_wanted(Settings(compile="max-autotune-no-cudagraphs"), plan)
    # Timing a convolution inside a CUDA-graph capture fails the capture (run 27): off unless asked for.
    assert not cudnn_benchmark_wanted(Settings(compile="reduce-overhead"), plan)
    assert not cudnn_benchmark_wanted(Settings(compile="max-autotune"), plan)
    assert cudnn_benchmark_wanted(Settings(compile="default", cudnn_benchmark=True), plan)
    assert not cudnn_benchmark_wanted(Settings(compile="default", cudnn_benchmark=False), plan)
    assert not cudnn_benchmark_wanted(
        Settings(compile="default"), plan_hardware(DeviceInfo("cpu"), Settings())
    )


@pytest.mark.parametrize(
    ("compile_mode", "decoder_mode"),
    [
        ("default", None),
        ("reduce-overhead", None),
        ("max-autotune", "max-autotune-no-cudagraphs"),
        ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
    ],
)
def test_the_decoder_compiles_as_the_unets_without_cuda_graphs(
    compile_mode: str, decoder_mode: str | None
) -> None:
    assert decoder_compile_mode(Settings(compile=compile_mode)) == decoder_mode


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cudnn_benchmark_with_a_cuda_graph_mode_is_refused_naming_both_settings(mode: str) -> None:
    """Opted in with CUDA graphs, the capture failed (run 27) and the eager fallback crashed the process
    (segmentation fault, run 32): refused at start-up, with the fix, rather than served."""
    with pytest.raises(ValidationError) as refused:
        Settings(compile=mode, cudnn_benchmark=True)
    (line,) = settings_error_lines(refused.value)
    assert line.startswith("IMAGESMITH_CUDNN_BENCHMARK: ")
    assert f"IMAGESMITH_COMPILE={mode}" in line and "IMAGESMITH_COMPILE=default" in line
    # Off, or left to the default, stays allowed with CUDA graphs.
    assert Settings(compile=mode, cudnn_benchmark=False).cudnn_benchmark is False
    assert Settings(compile=mode).cudnn_benchmark is None


def test_fp8_settings_with_a_plan_made_without_them_are_refused(tiny_settings: Settings) -> None:
    """The fp8 decision lives in the hardware plan; levers applied with a plan made from other settings must
    not quietly run bf16 while reporting an fp8 configuration."""
    engine = Engine.start(tiny_settings)
    with pytest.raises(ValueError, match="plan was made without it"):
        apply_speed_levers(
            engine.models.base, engine.models.refiner, engine.plan, tiny_settings.with_changes(fp8=True)
        )


def test_a_failing_compile_falls_back_to_eager_and_says_so(tiny_settings: Settings) -> None:
    """An unsupported card or a torch bug must not keep the server from serving: warm-up reverts to eager."""
    from imagesmith.engine.fast import warm_up_or_fall_back_to_eager

    engine = Engine.start(
        tiny_settings.with_changes(fuse_qkv=False, encode_ahead=False, empty_negative_shortcut=False)
    )

    def broken_compiled_call(*args: object, **kwargs: object) -> None:
        raise RuntimeError("inductor: no kernel for this card (simulated)")

    unet = engine.models.base.unet
    unet._compiled_call_impl = broken_compiled_call  # what Module.compile installs, failing
    engine.levers.append("torch.compile(mode=default) UNets + VAE decoder")
    warm_up_or_fall_back_to_eager(engine, [(64, 64)], [1])
    assert unet._compiled_call_impl is None
    assert engine.levers == ["torch.compile failed, eager instead (RuntimeError)"]
    assert engine.generate(REQUEST).images


def test_warm_up_reports_where_it_is(tiny_engine: Engine) -> None:
    """A cold compiled start takes minutes; the warm-up says which shape and stage it has reached."""
    from imagesmith.engine.fast import warm_up

    heard: list[str] = []
    warm_up(tiny_engine, [(64, 64)], [1, 2], heard.append)
    assert heard[0] == "warm-up 1 of 2 (64x64, batch 1): starting"
    first = [message for message in heard if message.startswith("warm-up 1 of 2")]
    stages = [message.split(": ")[1].split(" step")[0] for message in first[1:]]
    assert stages[0] == "base" and "refine" in stages
    # The decode has no steps: "decoding" while it runs (it said "decode step 0 of 1 done"), then "decoded".
    assert first[-2:] == [
        "warm-up 1 of 2 (64x64, batch 1): decoding",
        "warm-up 1 of 2 (64x64, batch 1): decoded",
    ]
    assert "warm-up 2 of 2 (64x64, batch 2): starting" in heard


def test_warm_up_makes_one_preview_as_the_worker_does(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's first preview must not pay the preview path's one-time costs mid-pass: the warm-up makes one
    from a pass's latents and encodes it, once, however many passes it runs."""
    import imagesmith.engine.fast as fast
    from imagesmith.preview import PreviewCopy

    made: list[Any] = []
    encoded: list[str] = []

    class RecordingPreview(PreviewCopy):
        def __init__(self, latents: Any, index: int = 0) -> None:
            made.append(latents.shape)
            super().__init__(latents, index)

        def data_url(self, max_side: int = 128) -> str:
            encoded.append(super().data_url(max_side))
            return encoded[-1]

    monkeypatch.setattr(fast, "PreviewCopy", RecordingPreview)
    fast.warm_up(tiny_engine, [(64, 64)], [1, 2])
    assert len(made) == 1 and made[0][-2:] == (8, 8)  # 64x64 pixels: 8x8 latents
    assert len(encoded) == 1 and encoded[0].startswith("data:image/jpeg;base64,")


def test_health_detail_names_the_warm_up_step_while_starting(tiny_settings: Settings) -> None:
    import threading

    from imagesmith.sources.base import SourceState
    from imagesmith.sources.generate import GenerateSource

    engine = Engine.start(tiny_settings)
    release, inside = threading.Event(), threading.Event()
    real_generate_batch = engine.generate_batch

    def slow_generate_batch(items: list[object]) -> list[object]:
        inside.set()
        release.wait(30)
        return real_generate_batch(items)  # type: ignore[arg-type]

    engine.generate_batch = slow_generate_batch  # type: ignore[method-assign]
    source = GenerateSource(tiny_settings.with_changes(warmup_sizes="64x64"), factory=lambda _: engine)
    thread = source.start_loading()
    assert inside.wait(30)
    status = source.status()
    assert status.state is SourceState.STARTING
    assert status.detail.startswith("warm-up 1 of 1 (64x64, batch 1): starting (")
    assert status.detail.endswith("s after process start)")
    release.set()
    thread.join(30)
    assert source.status().state is SourceState.READY


def test_an_earlier_engines_cudnn_benchmark_does_not_carry_into_cuda_graphs(tiny_settings: Settings) -> None:
    """The flag is process-wide: an engine that wants it off must turn it off, not leave what was there."""
    import torch

    engine = Engine.start(tiny_settings)
    gpu = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True  # as a compile=default engine before this one left it
        applied = apply_speed_levers(engine.models.base, None, plan_hardware(gpu, Settings()), Settings())
        assert torch.backends.cudnn.benchmark is False and "cudnn.benchmark" not in applied
    finally:
        torch.backends.cudnn.benchmark = previous


@pytest.mark.parametrize(("dynamic", "compiles"), [(False, 2), (True, 1)])
def test_compile_dynamic_compiles_the_unet_once_for_every_batch_size(
    tiny_settings: Settings, dynamic: bool, compiles: int
) -> None:
    """The premise of IMAGESMITH_COMPILE_DYNAMIC, on the real (tiny) UNet with the engine's own options:
    by default dynamo compiles again when the batch changes (the service's second, batched warm-up)."""
    import torch
    from torch._dynamo.testing import CompileCounter

    from imagesmith.engine.fast import unet_compile_options

    options = unet_compile_options(Settings(compile="reduce-overhead", compile_dynamic=dynamic))
    assert options["mode"] == "reduce-overhead" and options["fullgraph"]
    unet = Engine.start(tiny_settings).models.base.unet
    reset_dynamo()  # dynamo remembers which sizes went dynamic, per code object, across instances
    counter = CompileCounter()
    compiled = torch.compile(unet, fullgraph=True, dynamic=options["dynamic"], backend=counter)
    config = unet.config
    try:
        # Batch 1 and batch 3, each with classifier-free guidance. Not batch 8: on the CPU a convolution guard
        # (2 <= rows <= 15) recompiles there; what a GPU does at 16 rows is for the GPU run to show.
        for rows in (2, 6):
            args, kwargs = unet_inputs(config, rows)
            compiled(*args, **kwargs)
    finally:
        reset_dynamo()
    assert counter.frame_count == compiles


def test_one_image_passes_keep_their_static_graph_after_batched_passes_compile(
    tiny_settings: Settings,
) -> None:
    """The routed UNet (the default with compile): one image's pass (2 rows with guidance) on the graph
    compiled for it, every batched pass on one graph dynamic in the batch; two compiles in all, as plain
    Module.compile needs, but the one-image pass no longer moves to the batch-dynamic graph."""
    import torch

    from imagesmith.engine.batch_routing import BatchRoutedCall

    unet = Engine.start(tiny_settings).models.base.unet
    reset_dynamo()
    graphs = GraphRecording()
    routed = BatchRoutedCall(unet._call_impl, {"fullgraph": True, "dynamic": None, "backend": graphs.backend})
    routed.keep_static((16, 16))  # unet_inputs' latents, as a warm-up at their size would
    seen: dict[str, list[int]] = {"single": [], "batched": []}

    def recording(name: str) -> Callable[..., Any]:
        compiled = getattr(routed, name)

        def call(sample: Any, *args: Any, **kwargs: Any) -> Any:
            seen[name].append(sample.shape[0])
            return compiled(sample, *args, **kwargs)

        return call

    for name in seen:
        setattr(routed, name, recording(name))
    try:
        with torch.no_grad():
            outputs = {}
            # Batched passes first: the batched graph must be dynamic from its first compile (not static for
            # 6 rows, then again for 4), and the one-image graph static although a dynamic one came before.
            for rows in (6, 4, 10, 2, 2):
                args, kwargs = unet_inputs(unet.config, rows)
                outputs[rows] = (routed(*args, **kwargs), unet._call_impl(*args, **kwargs))
    finally:
        reset_dynamo()
    assert seen == {"single": [2, 2], "batched": [6, 4, 10]}
    assert graphs.compiled == [True, False], "one batch-dynamic compile, then one static compile"
    for compiled_output, eager_output in outputs.values():
        torch.testing.assert_close(compiled_output.sample, eager_output.sample)


def _graphs_through_sizes(engine: Engine, route: bool) -> dict[str, Any]:
    """The engine's two UNets and its VAE decoder, compiled with a recording backend that runs the graphs as
    traced (no inductor: seconds on a CPU), through a warm-up at two sizes (batches 1 and 4), then one-image
    requests: at a new size, at a warmed-up size without guidance, at two more new sizes, and at a warmed-up
    size as the warm-up ran it. `route`: the engine's routing (engine/batch_routing.py, engine/size_routing.py);
    else plain Module.compile. Returns the graphs compiled after the warm-up and after each request, whether
    each graph run by the last request had symbolic sizes, and the engine's levers."""

    from imagesmith.engine.batch_routing import BatchRoutedCall
    from imagesmith.engine.engine import BatchItem
    from imagesmith.engine.fast import warm_up

    recording = GraphRecording()
    compiled, ran = recording.compiled, recording.ran
    options = {"fullgraph": True, "dynamic": None, "backend": recording.backend}
    unets = [engine.models.base.unet, engine.models.refiner.unet]
    decoder = engine.models.base.vae.decoder
    levers = list(engine.levers)
    reset_dynamo()
    try:
        for unet in unets:
            if route:
                unet._compiled_call_impl = BatchRoutedCall(unet._call_impl, options)
            else:
                unet.compile(**options)
        if route:
            decoder._compiled_call_impl = SizeRoutedCall(decoder._call_impl, options)
        else:
            decoder.compile(**options)
        # An oblong size (width 96, height 64): a warm-up that swapped the sides would leave it on the dynamic graph.
        warm_up(engine, [(64, 64), (96, 64)], [1, 4])
        result: dict[str, Any] = {"after_warm_up": len(compiled), "after_request": []}
        requests = [(128, 64, 7.5), (64, 64, 1.0), (64, 96, 7.5), (128, 128, 7.5), (96, 64, 7.5)]
        for width, height, guidance in requests:
            request = GenerationRequest(
                prompt="a lighthouse",
                width=width,
                height=height,
                num_inference_steps=4,
                seed=1,
                guidance_scale=guidance,
            )
            ran.clear()
            assert not isinstance(engine.generate_batch([BatchItem(request, None)])[0], BaseException)
            result["after_request"].append(len(compiled))
        result["last_request_ran_dynamic"] = list(ran)
        result["levers"] = list(engine.levers)
        return result
    finally:
        for module in [*unets, decoder]:
            module._compiled_call_impl = None
        engine.levers[:] = levers  # a fallback to eager is noted there
        reset_dynamo()


def test_warmed_up_sizes_keep_static_graphs_and_new_sizes_share_one(tiny_settings: Settings) -> None:
    """Plain Module.compile serves a warmed-up size from the graph with symbolic height and width once a second
    size has come (the VAE decoder's was 33 % slower, run 82). Routed, every graph the warmed-up request runs is
    static, and new sizes after the first add no graph. (Compiled fully static, each size was a graph of its own,
    and the base and refiner, one class, reached dynamo's default limit of 8 at the third size: compile turned off
    for good. The engine now raises the limit too.)"""
    import torch._dynamo.config

    from imagesmith.engine.fast import UNET_GRAPHS_ALLOWED

    # Without the empty-negative shortcut, whose second warm-up pass per shape adds the base's graphs it counts.
    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False, empty_negative_shortcut=False))
    with torch._dynamo.config.patch(recompile_limit=UNET_GRAPHS_ALLOWED):  # as compile sets it
        plain = _graphs_through_sizes(engine, route=False)
        routed = _graphs_through_sizes(engine, route=True)
    for run in (plain, routed):
        assert not any("eager instead" in lever for lever in run["levers"]), run["levers"]
    # The last request (a size and a pass the warm-up ran): 8 UNet calls and a decode.
    assert len(plain["last_request_ran_dynamic"]) == len(routed["last_request_ran_dynamic"]) > 1
    assert any(plain["last_request_ran_dynamic"])  # what the routing is for
    assert not any(routed["last_request_ran_dynamic"])
    # Warm-up: per UNet a one-image and a batched graph for each of the two sizes, and the decoder's two.
    assert routed["after_warm_up"] == 2 * 2 * 2 + 2
    first_new_size, no_guidance, *later = routed["after_request"]
    # The first new size: one graph for every other size, per UNet and for the decoder.
    assert first_new_size == routed["after_warm_up"] + 3
    assert no_guidance == first_new_size + 2  # one row per image: each UNet's pass of a new shape
    # No graph per size after that. One more at most: torch's CPU convolution guards its output's size (the
    # decoder's any-size graph recompiles once past 160 latent positions at the tiny VAE's widths).
    assert later == sorted(later) and later[-1] <= no_guidance + 1


def test_compile_raises_dynamos_graph_limit(tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo.config

    from imagesmith.engine import fast

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False))
    monkeypatch.setattr(fast, "use_persistent_compile_cache", lambda cache: cache)
    modules = [engine.models.base.unet, engine.models.refiner.unet, engine.models.base.vae.decoder]
    with torch._dynamo.config.patch(recompile_limit=8):
        try:
            apply_speed_levers(
                engine.models.base,
                engine.models.refiner,
                engine.plan,
                Settings(compile="default", fuse_qkv=False),
            )
            raised = torch._dynamo.config.recompile_limit
        finally:
            for module in modules:
                module._compiled_call_impl = None
    assert raised == fast.UNET_GRAPHS_ALLOWED


def test_the_warm_up_compiles_the_largest_pass_the_worker_can_run() -> None:
    from imagesmith.sources.generate import warm_up_batches

    assert warm_up_batches(Settings()) == [1]  # eager: nothing to compile
    assert warm_up_batches(Settings(compile="reduce-overhead")) == [1, 8]  # batch_max_images
    # One request of max_images_per_request images runs alone, however small batch_max_images is.
    assert warm_up_batches(Settings(compile="reduce-overhead", batch_max_images=1)) == [1, 4]
    assert warm_up_batches(Settings(compile="default", batch_max_images=2, max_images_per_request=3)) == [
        1,
        3,
    ]
    assert warm_up_batches(Settings(compile="default", batch_max_images=1, max_images_per_request=1)) == [1]


def test_the_unets_are_compiled_with_the_dynamic_option_and_the_decoder_is_not(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagesmith.engine import fast

    engine = Engine.start(tiny_settings)
    calls: dict[str, dict[str, object]] = {}
    modules = {
        "base unet": engine.models.base.unet,
        "refiner unet": engine.models.refiner.unet,
        "decoder": engine.models.base.vae.decoder,
    }
    for name, module in modules.items():
        monkeypatch.setattr(module, "compile", lambda name=name, **kwargs: calls.__setitem__(name, kwargs))
    monkeypatch.setattr(fast, "use_persistent_compile_cache", lambda cache: cache)
    settings = Settings(compile="reduce-overhead", compile_dynamic=True, fuse_qkv=False)
    applied = apply_speed_levers(engine.models.base, engine.models.refiner, engine.plan, settings)

    dynamic = {"fullgraph": True, "mode": "reduce-overhead", "dynamic": True}
    assert calls["base unet"] == dynamic and calls["refiner unet"] == dynamic
    # One image at a time, and without CUDA graphs (fast.decoder_compile_mode says why). Routed by size, with
    # no dynamic option (the routing marks the sides; the attention bound is guarded in its traced code).
    decoder = modules["decoder"]._compiled_call_impl
    assert isinstance(decoder, SizeRoutedCall) and "decoder" not in calls
    assert decoder.options == {"fullgraph": True, "mode": None}
    assert (
        "torch.compile(mode=reduce-overhead, dynamic shapes, timed reductions) UNets + VAE decoder" in applied
    )

    # By default each UNet is routed: a static graph for one image, a batch-dynamic one for batches.
    calls.clear()
    try:
        applied = apply_speed_levers(
            engine.models.base,
            engine.models.refiner,
            engine.plan,
            Settings(compile="reduce-overhead", fuse_qkv=False),
        )
        for name in ("base unet", "refiner unet"):
            routed = modules[name]._compiled_call_impl
            assert isinstance(routed, BatchRoutedCall) and name not in calls
        assert isinstance(modules["decoder"]._compiled_call_impl, SizeRoutedCall) and "decoder" not in calls
        assert "torch.compile(mode=reduce-overhead, timed reductions) UNets + VAE decoder" in applied
    finally:
        for module in modules.values():
            module._compiled_call_impl = None


def test_closing_the_source_while_models_load_skips_the_warm_up_and_the_exit_waits_for_the_thread(
    tiny_engine: Engine, tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A server told to stop while its models load: close() returns at once (a SIGTERM ends the process right
    after it), no warm-up starts once loading ends, and the exit guard knows the thread to wait for."""
    import threading

    from imagesmith import exit_guard
    from imagesmith.sources.base import SourceState
    from imagesmith.sources.generate import GenerateSource

    release, inside = threading.Event(), threading.Event()
    passes: list[object] = []

    def slow_factory(_: Settings) -> Engine:
        inside.set()
        release.wait(30)
        return tiny_engine

    source = GenerateSource(tiny_settings.with_changes(warmup_sizes="64x64"), factory=slow_factory)
    real = tiny_engine.generate_batch
    tiny_engine.generate_batch = lambda items: passes.append(items) or real(items)  # type: ignore[method-assign]
    try:
        thread = source.start_loading()
        assert inside.wait(30)
        assert source in exit_guard._OWNERS
        with caplog.at_level("INFO", logger="imagesmith.sources.generate"):
            source.close()
            assert thread.is_alive() and "stopping start-up (models loading)" in caplog.text
            assert source.stop_for_exit() is thread
            threading.Timer(0.2, release.set).start()
            assert exit_guard.end_threads([source], wait_s=30) == []
        assert passes == []  # no warm-up after the stop
        assert "start-up stopped after the models loaded, before warm-up" in caplog.text
        assert source.status().state is SourceState.STARTING  # never ready: it was stopped
        assert source.stop_for_exit() is None
    finally:
        tiny_engine.generate_batch = real  # type: ignore[method-assign]
        release.set()


def test_a_stopped_warm_up_ends_within_a_step_and_is_not_a_compile_failure(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagesmith.engine import fast
    from imagesmith.engine.progress import CancelToken, GenerationCanceled

    # As if compiled: a failed compiled warm-up falls back to eager, and a stop must not be taken for one.
    monkeypatch.setattr(fast, "compiled_modules", lambda _engine: [tiny_engine.models.base.unet])
    fell_back: list[BaseException] = []
    monkeypatch.setattr(fast, "serve_eager_from_now", lambda _engine, error, _what: fell_back.append(error))
    stop = CancelToken()
    heard: list[str] = []

    def report(message: str) -> None:
        heard.append(message)
        if "base step 1 of" in message:
            stop.cancel()

    with pytest.raises(GenerationCanceled):
        fast.warm_up_or_fall_back_to_eager(tiny_engine, [(64, 64)], [1, 2], report, stop)
    steps = [message for message in heard if " step " in message]
    assert steps == [steps[0]] and "base step 1 of" in steps[0]  # no step after the stop
    assert not any(message.startswith("warm-up 2 of 2") for message in heard)
    assert fell_back == []


def test_a_warm_up_failing_after_a_stop_logs_the_stop_not_a_broken_model(
    tiny_engine: Engine, tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C while the warm-up compiles: the stop cuts the compile short and it raises (a black-box session saw
    inductor fail on an interpreter on its way out). That is the stop's doing: one INFO line, no traceback, no
    "model loading failed", and health never reports the models as failed."""
    import threading

    from imagesmith.sources.base import SourceState
    from imagesmith.sources.generate import GenerateSource

    inside, release = threading.Event(), threading.Event()
    source = GenerateSource(tiny_settings.with_changes(warmup_sizes="64x64"), factory=lambda _: tiny_engine)
    real = tiny_engine.generate_batch

    def cut_short(items: object) -> object:
        inside.set()
        release.wait(30)
        raise AttributeError("'_OpNamespace' 'prims' object has no attribute 'device_put'")

    tiny_engine.generate_batch = cut_short  # type: ignore[method-assign,assignment]
    try:
        with caplog.at_level("INFO"):
            thread = source.start_loading()
            assert inside.wait(30)
            source.close()  # the server's stop, while the warm-up's pass is inside torch
            release.set()
            thread.join(30)
        assert "start-up stopped during warm-up 1 of 1" in caplog.text
        assert "(AttributeError: '_OpNamespace' 'prims' object has no attribute 'device_put')" in caplog.text
        assert "model loading failed" not in caplog.text
        assert not [record for record in caplog.records if record.levelname == "ERROR"]
        assert source.status().state is SourceState.STARTING
    finally:
        tiny_engine.generate_batch = real  # type: ignore[method-assign]
        release.set()


def test_a_compiled_engine_quiets_dynamos_lru_cache_warning_and_no_other(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every compiled start printed a dozen lines of it (run 114): Dynamo traces diffusers' lru_cache'd
    is_torch_version in the upsamplers. Here the same kind of call, traced after the engine's levers."""
    import functools
    import warnings

    import torch

    from imagesmith.engine import fast

    engine = Engine.start(tiny_settings)
    monkeypatch.setattr(fast, "use_persistent_compile_cache", lambda cache: cache)

    @functools.lru_cache
    def torch_is_recent() -> bool:
        return True

    def doubled(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if torch_is_recent() else x

    modules = [engine.models.base.unet, engine.models.refiner.unet, engine.models.base.vae.decoder]
    try:
        with warnings.catch_warnings(record=True) as heard:
            warnings.simplefilter("always")  # every warning heard, as a fresh process hears each once
            apply_speed_levers(
                engine.models.base,
                engine.models.refiner,
                engine.plan,
                Settings(compile="default", fuse_qkv=False),
            )
            reset_dynamo()
            assert torch.equal(torch.compile(doubled, backend="eager")(torch.ones(2)), torch.full((2,), 2.0))
            warnings.warn("another warning still gets through", UserWarning, stacklevel=1)
    finally:
        for module in modules:
            module._compiled_call_impl = None
    said = [str(warning.message) for warning in heard]
    assert not [text for text in said if "lru_cache" in text], said
    assert "another warning still gets through" in said
