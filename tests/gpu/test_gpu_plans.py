"""On a CUDA GPU: every memory plan generates (the tiny model, so it runs in seconds). Skipped without CUDA.

Run on the device machine with `pytest -m gpu tests/gpu`. These caught the offload decode-device bug that no
CPU test can see: with CPU offload the VAE's weights rest on the CPU between uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.cudnn_graphs import cudnn_frontend_available
from imagesmith.engine.fast import compiled_modules
from imagesmith.schemas import GenerationRequest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("offload", ["none", "model", "sequential"])
@pytest.mark.parametrize("mode", ["ensemble", "img2img", "none"])
def test_every_offload_plan_generates(tiny_settings: Settings, offload: str, mode: str) -> None:
    engine = Engine.start(
        tiny_settings.with_changes(**{"device": "cuda", "offload": offload, "fuse_qkv": True})
    )
    assert engine.plan.dtype_name == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")
    result = engine.generate(
        GenerationRequest(
            prompt="x", width=128, height=128, num_inference_steps=10, refine_mode=mode, seed=1, num_images=2
        )
    )
    assert [image.size for image in result.images] == [(128, 128)] * 2
    assert all(np.asarray(image).std() > 0 for image in result.images)
    assert result.metadata.refined is (mode != "none")


def _psnr(reference: Engine, engine: Engine, request: GenerationRequest) -> float:
    """PSNR in dB of `engine`'s image against `reference`'s, for the same request."""
    a = np.asarray(reference.generate(request).images[0]).astype(float)
    b = np.asarray(engine.generate(request).images[0]).astype(float)
    return float(10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12)))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_engine_matches_eager_within_bf16(tiny_settings: Settings, mode: str) -> None:
    request = GenerationRequest(prompt="x", width=128, height=128, num_inference_steps=10, seed=4)
    eager = Engine.start(tiny_settings.with_changes(**{"device": "cuda"}))
    compiled = Engine.start(tiny_settings.with_changes(**{"device": "cuda", "compile": mode}))
    psnr = _psnr(eager, compiled, request)
    assert psnr > 30, psnr
    assert len(compiled_modules(compiled)) == 3, compiled.levers  # not the engine's eager fallback


def _warm_up_on_one_thread_then_generate_on_another(engine: Engine) -> list[int]:
    """As the service does it: warm-up on the loading thread (batches 1 and 2), requests on the worker thread
    (batch 1, then batch 3, never warmed up, so it records a new graph). Errors reach the test."""
    from concurrent.futures import ThreadPoolExecutor

    from imagesmith.engine.fast import warm_up

    with ThreadPoolExecutor(1) as loader:
        loader.submit(warm_up, engine, [(128, 128)], [1, 2]).result()

    def requests() -> list[int]:
        counts = []
        for count in (1, 3):
            request = GenerationRequest(
                prompt="x", width=128, height=128, num_inference_steps=10, seed=5, num_images=count
            )
            counts.append(len(engine.generate(request).images))
        return counts

    with ThreadPoolExecutor(1) as worker:
        return worker.submit(requests).result()


def test_cuda_graphs_warmed_on_one_thread_serve_requests_from_another(tiny_settings: Settings) -> None:
    """With `reduce-overhead` and a batched warm-up, every request failed on torch 2.11 (AssertionError in
    cudagraph_trees.get_obj: a new graph recorded on a thread without a CUDA-graph tree; runs 25-26)."""
    engine = Engine.start(tiny_settings.with_changes(**{"device": "cuda", "compile": "reduce-overhead"}))
    assert "cudnn.benchmark" not in engine.levers  # timing inside a capture fails it (run 27)
    assert _warm_up_on_one_thread_then_generate_on_another(engine) == [1, 3]
    # Served compiled, not by the engine's eager fallback.
    assert len(compiled_modules(engine)) == 3, engine.levers


def test_the_empty_negative_shortcut_with_cuda_graphs_compiles_nothing_on_a_request(
    tiny_settings: Settings,
) -> None:
    """The shortcut (on by default) read by graphs recorded as CUDA graphs: after the warm-up, requests with and
    without a negative prompt replay warmed graphs (none runs uncompiled) and give the eager image without the
    shortcut within bf16."""
    from imagesmith.engine.fast import stop_compiling_on_requests, warm_up
    from imagesmith.uncompiled_calls import uncompiled_calls

    eager = Engine.start(tiny_settings.with_changes(device="cuda", empty_negative_shortcut=False))
    engine = Engine.start(tiny_settings.with_changes(device="cuda", compile="reduce-overhead"))
    assert any("guided rows only" in lever for lever in engine.levers), engine.levers
    warm_up(engine, [(128, 128)], [1])
    stop_compiling_on_requests(engine)
    before = uncompiled_calls()
    for negative in ("", "blurry", ""):
        request = GenerationRequest(
            prompt="x", negative_prompt=negative, width=128, height=128, num_inference_steps=10, seed=6
        )
        psnr = _psnr(eager, engine, request)
        assert psnr > 30, (negative, psnr)
    ran_uncompiled = {kind: n - before.get(kind, 0) for kind, n in uncompiled_calls().items()}
    assert not {kind: n for kind, n in ran_uncompiled.items() if n}, ran_uncompiled
    assert len(compiled_modules(engine)) == 3, engine.levers


FP8_CARD = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs fp8 tensor cores",
)

HOPPER_WITH_CUDNN_FRONTEND = pytest.mark.skipif(
    not torch.cuda.is_available()
    or torch.cuda.get_device_capability() < (9, 0)
    or not cudnn_frontend_available(),
    reason="cuDNN's fp8 convolutions need Hopper and nvidia-cudnn-frontend",
)


@FP8_CARD
@pytest.mark.parametrize("scaling", ["static", "dynamic"])
def test_fp8_scaled_mm_gives_the_product_of_the_quantized_operands(scaling: str) -> None:
    """torch._scaled_mm on the GPU (fast accumulation, the bias in its epilogue where one scale per tensor)
    computes what the CPU path (and its tests) compute: the same e4m3 operands multiplied with fp32
    accumulation, written in bf16."""
    from torch import nn

    from imagesmith.engine.fp8 import Float8Linear, calibrate_static_scales

    torch.manual_seed(0)
    if scaling == "dynamic":  # what the hardware plan picks
        scaling = "row-wise" if torch.cuda.get_device_capability() >= (9, 0) else "per-tensor"
    layer = nn.Linear(640, 2560).to("cuda", torch.bfloat16)
    gpu = Float8Linear(layer, scaling)
    cpu = Float8Linear(layer.to("cpu"), scaling)
    x = torch.randn(2, 4096, 640, dtype=torch.bfloat16)
    with torch.no_grad():
        if scaling == "static":
            calibrate_static_scales([gpu], lambda: gpu(x.cuda()))
            assert gpu.input_scale is not None
            cpu.input_scale = gpu.input_scale.cpu()
        got, expected = gpu(x.cuda()).float().cpu(), cpu(x).float()
    assert float((got - expected).norm() / expected.norm()) < 1e-2  # bf16 output rounding only


@FP8_CARD
@pytest.mark.parametrize(("m", "k", "n", "bias"), [(300, 640, 2560, True), (50, 96, 80, False)])
def test_the_fused_geglu_kernel_computes_the_cpu_reference(m: int, k: int, n: int, bias: bool) -> None:
    """engine/fp8_geglu_kernel.py (Triton, TMA, fast fp8 accumulation) against the op's fp32 path on the same
    e4m3 operands: rows that are no multiple of a tile, a K that is none of BLOCK_K (TMA's zero fill), no bias."""
    from imagesmith.engine.fp8 import e4m3_scales, to_e4m3
    from imagesmith.engine.fp8_geglu import fp8_geglu

    torch.manual_seed(m)
    x = torch.randn(m, k)
    w = torch.randn(2 * n, k) / k**0.5
    b = (torch.randn(2 * n) * 0.1).to(torch.bfloat16) if bias else None
    x_scale, w_scale = e4m3_scales(x, False), e4m3_scales(w, False)
    x8, w8 = to_e4m3(x, x_scale), to_e4m3(w, w_scale)
    descale, out_scale = (x_scale * w_scale).reshape(1), torch.tensor([2.0 / 448])
    expected = fp8_geglu(x8, w8, descale, b, out_scale).float()
    got = fp8_geglu(x8.cuda(), w8.cuda(), descale.cuda(), None if b is None else b.cuda(), out_scale.cuda())
    assert got.dtype == torch.float8_e4m3fn and got.shape == (m, n)
    got = got.float().cpu()
    assert float((got == expected).float().mean()) > 0.9  # most land on the same e4m3 value
    assert float((got - expected).norm() / expected.norm()) < 1e-2  # the rest on a neighbour


@FP8_CARD
@pytest.mark.parametrize(
    "scales",
    [
        "static",
        "dynamic",
        pytest.param("static+convs", marks=HOPPER_WITH_CUDNN_FRONTEND),
        "static+geglu",
    ],
)
def test_compiled_fp8_engine_matches_its_eager_self(tiny_settings: Settings, scales: str) -> None:
    """The calibrated scales reach the compiled graphs (an input of the graph, like the weights), and both
    scalings, fp8 convolutions (IMAGESMITH_FP8_CONVS, their custom op) and the fused GEGLU (its Triton kernel
    in a custom op, autotuned on its first call) compile with CUDA graphs."""
    from imagesmith.engine.fp8 import static_layers

    convs, geglu = scales == "static+convs", scales == "static+geglu"
    request = GenerationRequest(prompt="x", width=128, height=128, num_inference_steps=10, seed=4)
    settings = tiny_settings.with_changes(
        device="cuda",
        fp8=True,
        fp8_scales=scales.partition("+")[0],
        fp8_convs=convs,
        fp8_fused_geglu=geglu,
        warmup_sizes="128x128",
    )
    eager = Engine.start(settings)
    compiled = Engine.start(settings.with_changes(compile="reduce-overhead"))
    assert any(lever.startswith("fp8 convolutions") for lever in compiled.levers) is convs
    assert any(lever.startswith("fp8 GEGLU") for lever in compiled.levers) is geglu
    layers = static_layers([compiled.models.base.unet, compiled.models.refiner.unet])
    assert (len(layers) > 0) is scales.startswith("static")
    assert all(layer.input_scale is not None for layer in layers)
    psnr = _psnr(eager, compiled, request)
    assert psnr > 30, psnr
    assert len(compiled_modules(compiled)) == 3, compiled.levers  # not the engine's eager fallback


@HOPPER_WITH_CUDNN_FRONTEND
@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (1, 1)])
def test_cudnn_fp8_convolution_gives_the_convolution_of_the_quantized_operands(
    kernel: int, stride: int
) -> None:
    """cuDNN's fp8 kernel (its fastest plan, chosen on the first call) computes what the CPU path (and its tests)
    compute from the same e4m3 operands, and replays the same inside a CUDA graph, as reduce-overhead runs it."""
    from torch import nn

    from imagesmith.engine.fp8 import calibrate_static_scales
    from imagesmith.engine.fp8_conv import Float8Conv2d

    torch.manual_seed(kernel + stride)
    conv = nn.Conv2d(320, 640, kernel, stride=stride, padding=kernel // 2).to(torch.bfloat16)
    cpu, gpu = Float8Conv2d(conv), Float8Conv2d(conv.to("cuda"))
    x = torch.randn(2, 320, 64, 64, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        calibrate_static_scales([gpu], lambda: gpu(x.cuda()))
        assert gpu.input_scale is not None
        cpu.input_scale = gpu.input_scale.cpu()
        got, expected = gpu(x.cuda()), cpu(x)
        assert float((got.float().cpu() - expected.float()).norm() / expected.float().norm()) < 1e-2
        static_x = x.cuda()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            gpu(static_x)  # warm: the shape's plan is chosen outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = gpu(static_x)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, got)


@HOPPER_WITH_CUDNN_FRONTEND
def test_a_restart_runs_the_remembered_cudnn_plan_without_timing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch import nn

    from imagesmith.engine import fp8_conv
    from imagesmith.engine.cudnn_plan_file import PlanChoices

    torch.manual_seed(1)
    layer = fp8_conv.Float8Conv2d(nn.Conv2d(640, 640, 3, padding=1).to("cuda", torch.bfloat16))
    x = torch.randn(2, 640, 32, 32, device="cuda", dtype=torch.bfloat16)
    path = tmp_path / "fp8-conv-plans.json"
    first = fp8_conv._CudnnFp8Convolutions()
    first.choices = PlanChoices(path)
    monkeypatch.setattr(fp8_conv, "_CUDNN", first)
    with torch.no_grad():
        chosen = layer(x)
    assert path.exists()
    restarted = fp8_conv._CudnnFp8Convolutions()
    restarted.choices = PlanChoices(path)

    def no_timing(*args: object) -> dict[int, float]:
        raise AssertionError("the restart timed the plans again")

    monkeypatch.setattr(restarted, "_time_plans", no_timing)
    monkeypatch.setattr(fp8_conv, "_CUDNN", restarted)
    with torch.no_grad():
        again = layer(x)
    assert torch.equal(again, chosen)
    [chose], [reused] = first.reports, restarted.reports
    assert (chose["remembered"], reused["remembered"]) == (False, True)
    assert reused["name"] == chose["name"] and reused["plan"] == chose["plan"]
    assert len(chose["plans_ms"]) > 1 and reused["plans_ms"] == {}


@HOPPER_WITH_CUDNN_FRONTEND
def test_a_batch_size_near_a_timed_one_builds_its_plan_by_name_and_computes_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cuDNN names its plans before they are built (engine/cudnn_graphs.py relies on it to reuse a choice across
    batch sizes); the plan found by name at batch 8 is batch 16's, untimed, and its output is the CPU path's."""
    from torch import nn

    from imagesmith.engine import fp8_conv

    graphs = fp8_conv._CudnnFp8Convolutions()
    monkeypatch.setattr(fp8_conv, "_CUDNN", graphs)
    torch.manual_seed(3)
    conv = nn.Conv2d(640, 640, 3, padding=1).to(torch.bfloat16)
    cpu, gpu = fp8_conv.Float8Conv2d(conv), fp8_conv.Float8Conv2d(conv.to("cuda"))
    x = torch.randn(16, 640, 32, 32, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        gpu(x.cuda())
        got = gpu(x[:8].cuda())
        expected = cpu(x[:8])
    timed, reused = graphs.reports
    assert timed["by_name_from_batch"] is None and len(timed["plans_ms"]) > 1
    assert reused["by_name_from_batch"] == 16 and reused["name"] == timed["name"] and reused["plans_ms"] == {}
    assert float((got.cpu().float() - expected.float()).norm() / expected.float().norm()) < 1e-2
