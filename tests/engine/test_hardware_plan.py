"""The hardware plan for the cards users have, faked: precision, offload and VAE handling."""

from __future__ import annotations

from dataclasses import replace

import pytest

from imagesmith.config import OffloadChoice, PrecisionChoice, Settings
from imagesmith.engine.hardware import DeviceInfo, needs_tiling, plan_hardware

H100 = DeviceInfo(
    "cuda", name="NVIDIA H100 80GB HBM3", capability=(9, 0), total_memory_gib=79.6, free_memory_gib=78.9
)
RTX4090 = DeviceInfo("cuda", name="RTX 4090", capability=(8, 9), total_memory_gib=23.6, free_memory_gib=22.4)
RTX4080_16GB = DeviceInfo(
    "cuda", name="RTX 4080", capability=(8, 9), total_memory_gib=15.7, free_memory_gib=15.1
)
RTX4070_12GB = DeviceInfo(
    "cuda", name="RTX 4070", capability=(8, 9), total_memory_gib=11.7, free_memory_gib=11.2
)
A4000_16GB = DeviceInfo(
    "cuda", name="RTX A4000", capability=(8, 6), total_memory_gib=15.7, free_memory_gib=15.1
)
RTX3060_12GB = DeviceInfo(
    "cuda", name="RTX 3060", capability=(8, 6), total_memory_gib=11.8, free_memory_gib=11.2
)
RTX2060_6GB = DeviceInfo(
    "cuda", name="RTX 2060", capability=(7, 5), total_memory_gib=5.8, free_memory_gib=5.4
)
V100_32GB = DeviceInfo(
    "cuda", name="Tesla V100", capability=(7, 0), total_memory_gib=31.7, free_memory_gib=31.0
)
CPU = DeviceInfo("cpu")


def plan(device: DeviceInfo, **settings: object):
    return plan_hardware(device, Settings(**settings))  # type: ignore[arg-type]


def test_h100_runs_everything_resident_in_bf16_including_the_vae() -> None:
    p = plan(H100)
    assert (p.dtype_name, p.vae_dtype_name, p.offload, p.vae_tiling) == ("bf16", "bf16", "none", "large")
    assert p.device == "cuda:0"


def test_rtx4090_fits_without_offload_in_bf16() -> None:
    p = plan(RTX4090)
    assert (p.dtype_name, p.vae_dtype_name, p.offload) == ("bf16", "bf16", "none")


def test_12gb_card_uses_model_offload() -> None:
    p = plan(RTX3060_12GB)
    assert (p.dtype_name, p.offload) == ("bf16", "model")
    assert needs_tiling(p, 1344, 1024) and not needs_tiling(p, 1024, 1024)


def test_6gb_pre_ampere_card_streams_layers_in_fp16_with_fp32_vae_and_tiling() -> None:
    p = plan(RTX2060_6GB)
    assert (p.dtype_name, p.vae_dtype_name, p.offload) == ("fp16", "fp32", "sequential")
    assert p.vae_tiling == "always"


def test_pre_ampere_card_with_fixed_vae_decodes_in_fp16() -> None:
    p = plan(V100_32GB, vae_model="madebyollin/sdxl-vae-fp16-fix")
    assert (p.dtype_name, p.vae_dtype_name, p.offload) == ("fp16", "fp16", "none")


def test_large_memory_never_means_fp32() -> None:
    """The seed chose fp32 when memory was large: 5x slower for no gain. Memory never sets precision here."""
    for device in (H100, V100_32GB):
        assert plan(device).dtype_name != "fp32"


def test_cpu_is_fp32_without_offload() -> None:
    p = plan(CPU)
    assert (p.device, p.dtype_name, p.vae_dtype_name, p.offload) == ("cpu", "fp32", "fp32", "none")


@pytest.mark.parametrize("offload", ["none", "model", "sequential"])
def test_every_choice_can_be_overridden(offload: str) -> None:
    p = plan(H100, precision=PrecisionChoice.FP16, offload=OffloadChoice(offload), vae_tiling="on")
    assert (p.dtype_name, p.offload, p.vae_tiling) == ("fp16", offload, "always")
    assert "from settings" in p.summary()


def test_offload_settings_are_ignored_off_cuda() -> None:
    p = plan(CPU, offload=OffloadChoice.SEQUENTIAL)
    assert p.offload == "none" and "ignored" in p.summary()


def test_16gb_card_keeps_model_offload_and_24gb_goes_resident() -> None:
    assert plan(RTX4080_16GB).offload == "model" and plan(RTX4090).offload == "none"


def test_fp8_lets_a_16gb_ada_card_run_resident_but_not_a_12gb_one() -> None:
    # fp8 weights: the eager ensemble's peak is 9.9 GiB (run 47), so resident needs 12 GiB free, not 16.
    sixteen = plan(RTX4080_16GB, fp8=True)
    assert (sixteen.offload, sixteen.fp8) == ("none", "static")
    assert "15.1 GiB free >= 12 with fp8 weights" in sixteen.summary()
    twelve = plan(RTX4070_12GB, fp8=True)
    assert (twelve.offload, twelve.fp8) == ("model", None)
    assert "11.2 GiB free < 12 with fp8 weights" in twelve.summary()
    # A card without fp8 tensor cores gets bf16's threshold: fp8 would not shrink its weights.
    ampere = plan(A4000_16GB, fp8=True)
    assert (ampere.offload, ampere.fp8) == ("model", None)
    assert "< 16" in ampere.summary()


def test_plan_summary_gives_the_reasons_in_one_line() -> None:
    summary = plan(RTX3060_12GB).summary()
    assert "\n" not in summary and "model offload" in summary and "11.2 GiB free" in summary


def test_fp8_scales_follow_the_settings_and_the_card_and_need_resident_weights() -> None:
    assert plan(H100).fp8 is None  # opt-in
    # Static scales by default, on every card with fp8 tensor cores: one scale per tensor.
    assert plan(H100, fp8=True).fp8 == "static" and plan(RTX4090, fp8=True).fp8 == "static"
    assert plan(H100, fp8=True, fp8_scales="dynamic").fp8 == "row-wise"  # Hopper
    # Ada: fp8 tensor cores, no row-wise scaling
    assert plan(RTX4090, fp8=True, fp8_scales="dynamic").fp8 == "per-tensor"
    offloaded = plan(H100, fp8=True, offload="model")
    assert offloaded.fp8 is None and any("fp8 skipped" in reason for reason in offloaded.reasons)
    # Emulated off the GPU, for tests; said so in the reasons.
    assert plan(CPU, fp8=True).fp8 == "static" and plan(CPU, fp8=True, fp8_scales="dynamic").fp8 == "row-wise"
    with pytest.raises(RuntimeError, match=r"compute capability 8\.9\+"):
        plan(V100_32GB, fp8=True)


def test_fp8_without_compile_says_it_is_slower_than_bf16() -> None:
    # Eager, the quantization's kernels cost more than the fp8 matmuls save (run 47); compiled they fuse away.
    warning = "slower than bf16; set IMAGESMITH_COMPILE=reduce-overhead"
    assert warning in plan(H100, fp8=True).summary()
    assert warning not in plan(H100, fp8=True, compile="reduce-overhead").summary()
    assert warning not in plan(H100).summary()


def test_attention_backend_is_chosen_on_cuda_and_ignored_elsewhere_with_a_reason() -> None:
    assert plan(H100).attention == "auto"
    chosen = plan(H100, attention_backend="cudnn")
    assert chosen.attention == "cudnn"
    assert any("attention: cudnn first" in reason for reason in chosen.reasons)
    on_cpu = plan(CPU, attention_backend="flash")
    assert on_cpu.attention == "auto"
    assert any("attention backend flash ignored" in reason for reason in on_cpu.reasons)


def test_vae_tiling_off_holds_even_for_large_images_under_offload() -> None:
    tight = plan(RTX3060_12GB)  # model offload
    assert needs_tiling(tight, 1344, 1024)  # auto: large images tile while weights are offloaded
    off = plan(RTX3060_12GB, vae_tiling="off")
    assert off.offload == "model" and not needs_tiling(off, 1344, 1024)
    assert "vae_tiling=never" in off.summary()


def test_a_gpu_number_torch_does_not_see_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from imagesmith.engine.hardware import probe_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"torch sees 1 GPU\(s\), numbered from 0; set IMAGESMITH_DEVICE"):
        probe_device("cuda:1")
    with pytest.raises(ValueError, match="'cuda:N' with N a GPU number, got 'cuda:x'"):
        probe_device("cuda:x")


def test_the_plan_gives_fp8_convolutions_to_hopper_with_the_cudnn_frontend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(fp8=True, fp8_convs=True)
    monkeypatch.setattr("imagesmith.engine.cudnn_graphs.cudnn_frontend_available", lambda: True)
    plan = plan_hardware(H100, settings)
    assert plan.fp8 == "static" and plan.fp8_convs
    assert "fp8 convolutions through cuDNN" in plan.summary()
    assert not plan_hardware(H100, Settings(fp8=True)).fp8_convs
    # Ada has fp8 matmuls but cuDNN's fp8 convolutions need Hopper: a clear refusal, not a crash at the first image.
    with pytest.raises(RuntimeError, match="Hopper"):
        plan_hardware(RTX4090, settings)
    monkeypatch.setattr("imagesmith.engine.cudnn_graphs.cudnn_frontend_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'imagesmith\[fp8-convs\]'"):
        plan_hardware(H100, settings)


def test_off_the_gpu_fp8_convolutions_are_emulated_and_with_offload_skipped() -> None:
    cpu = plan_hardware(CPU, Settings(fp8=True, fp8_convs=True))
    assert cpu.fp8_convs and "fp8 convolutions emulated in fp32" in cpu.summary()
    offloaded = plan_hardware(H100, Settings(fp8=True, fp8_convs=True, offload="model"))
    assert offloaded.fp8 is None and not offloaded.fp8_convs
    assert "fp8 convolutions skipped: they need the fp8 linears" in offloaded.summary()


def test_the_plan_fuses_geglu_with_static_fp8_and_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(fp8=True, fp8_fused_geglu=True)
    monkeypatch.setattr("imagesmith.engine.geglu_feed_forward.triton_available", lambda: True)
    plan = plan_hardware(H100, settings)
    assert plan.fp8 == "static" and plan.fp8_fused_geglu and "(Triton)" in plan.summary()
    assert not plan_hardware(H100, Settings(fp8=True)).fp8_fused_geglu
    cpu = plan_hardware(CPU, settings)
    assert cpu.fp8_fused_geglu and "fused GEGLU emulated in fp32" in cpu.summary()
    offloaded = plan_hardware(H100, Settings(fp8=True, fp8_fused_geglu=True, offload="model"))
    assert offloaded.fp8 is None and not offloaded.fp8_fused_geglu
    assert "fp8 fused GEGLU skipped: it needs the fp8 linears" in offloaded.summary()
    monkeypatch.setattr("imagesmith.engine.geglu_feed_forward.triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs Triton.*unset IMAGESMITH_FP8_FUSED_GEGLU"):
        plan_hardware(H100, settings)


def test_the_plan_fuses_bf16_geglu_on_a_cuda_gpu_with_triton_and_says_why_not_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(fused_geglu=True)
    monkeypatch.setattr("imagesmith.engine.geglu_feed_forward.triton_available", lambda: True)
    plan = plan_hardware(H100, settings)
    assert plan.fused_geglu and "bf16 matmul (Triton)" in plan.summary()
    assert not plan_hardware(H100, Settings()).fused_geglu
    cpu = plan_hardware(CPU, settings)  # fp32 there: the kernel is bf16 and CUDA only
    assert not cpu.fused_geglu and "bf16 fused GEGLU skipped: it needs a CUDA GPU in bf16" in cpu.summary()
    ampere = plan_hardware(replace(H100, capability=(8, 0)), settings)
    assert not ampere.fused_geglu and "needs compute capability 9.0+" in ampere.summary()
    fp8 = plan_hardware(H100, Settings(fused_geglu=True, fp8=True))
    assert fp8.fp8 == "static" and not fp8.fused_geglu
    assert "IMAGESMITH_FP8_FUSED_GEGLU fuses those" in fp8.summary()
    monkeypatch.setattr("imagesmith.engine.geglu_feed_forward.triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs Triton.*unset IMAGESMITH_FUSED_GEGLU"):
        plan_hardware(H100, settings)


def test_unset_the_bf16_fused_geglu_is_on_where_it_was_measured_and_says_so_where_a_user_can_act(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run 98 measured it compiled on an H100: on there by default; elsewhere off, quietly where nothing can
    change that (eager, an older GPU, fp8), with a reason where something can (a newer GPU, no Triton)."""
    monkeypatch.setattr("imagesmith.engine.geglu_feed_forward.triton_available", lambda: True)
    compiled = Settings(compile="reduce-overhead")
    plan = plan_hardware(H100, compiled)
    assert plan.fused_geglu and "bf16 matmul (Triton)" in plan.summary()
    assert not plan_hardware(H100, compiled.with_changes(fused_geglu=False)).fused_geglu
    for quiet in (
        plan_hardware(H100, Settings()),  # eager: not measured
        plan_hardware(H100, compiled.with_changes(offload="model")),
        plan_hardware(replace(H100, capability=(8, 0)), compiled),
        plan_hardware(H100, compiled.with_changes(fp8=True)),
    ):
        assert not quiet.fused_geglu and "fused GEGLU" not in quiet.summary(), quiet.summary()
    newer = plan_hardware(replace(H100, capability=(10, 0)), compiled)
    assert not newer.fused_geglu and "measured on Hopper (9.x) only" in newer.summary()
    assert "IMAGESMITH_FUSED_GEGLU=true tries it" in newer.summary()
    assert plan_hardware(
        replace(H100, capability=(10, 0)), compiled.with_changes(fused_geglu=True)
    ).fused_geglu
    monkeypatch.setattr("imagesmith.engine.geglu_feed_forward.triton_available", lambda: False)
    no_triton = plan_hardware(H100, compiled)  # not an error: nobody asked for it
    assert not no_triton.fused_geglu and "Triton is not installed" in no_triton.summary()
