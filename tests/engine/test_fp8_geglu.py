"""The feed-forward's GEGLU fused into its first fp8 matmul (IMAGESMITH_FP8_FUSED_GEGLU, engine/fp8_geglu.py): which
feed-forwards fuse, the arithmetic (off the GPU the op's fp32 path on the same e4m3 operands the Triton kernel
gets), calibration through the unfused path, the op under torch.compile, the settings' rule. The Triton kernel
itself: tests/gpu."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention import FeedForward
from torch import nn

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.fp8 import Float8Linear, calibrate_static_scales, static_layers
from imagesmith.engine.fp8_geglu import Fp8GegluFeedForward, fusable, fuse_geglu_feed_forwards
from imagesmith.schemas import GenerationRequest


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def fp8_feed_forward(dim: int = 64, seed: int = 0) -> FeedForward:
    """A diffusers GEGLU feed-forward (bf16) with both linears static fp8, as engine/fp8.py leaves them."""
    torch.manual_seed(seed)
    ff = FeedForward(dim, activation_fn="geglu").to(torch.bfloat16).eval()
    ff.net[0].proj = Float8Linear(ff.net[0].proj, "static")
    ff.net[2] = Float8Linear(ff.net[2], "static")
    return ff


def test_the_fused_feed_forward_is_the_unfused_one_on_the_same_e4m3_operands() -> None:
    ff = fp8_feed_forward(seed=0)
    torch.manual_seed(0)  # the same weights in bf16: the reference fp8 approximates
    bf16 = FeedForward(64, activation_fn="geglu").to(torch.bfloat16).eval()
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        # Both linears learn a scale.
        assert calibrate_static_scales(static_layers([ff]), lambda: ff(x)) == 2
        fused = Fp8GegluFeedForward(ff)
        unfused_y, fused_y, bf16_y = ff(x), fused(x), bf16(x)
    assert fused_y.shape == unfused_y.shape == x.shape and fused_y.dtype == torch.bfloat16
    # The same e4m3 operands; the fused kernel skips the bf16 rounding of the product before GEGLU, which moves
    # a few GEGLU outputs to the neighbouring e4m3 value (2^-4 apart): a small share of fp8's own error.
    assert relative_l2(fused_y, unfused_y) < 0.02
    assert 0.005 < relative_l2(fused_y, bf16_y) < 0.08  # lossy like fp8, not broken
    assert "fused into the first fp8 matmul" in repr(fused)


def test_it_runs_unfused_until_both_scales_are_calibrated_and_while_calibrating() -> None:
    ff = fp8_feed_forward(seed=1)
    fused = Fp8GegluFeedForward(ff)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    calls: list[str] = []
    fused.proj.register_forward_hook(lambda *_: calls.append("proj"))
    with torch.no_grad():
        fused(x)  # uncalibrated: per-call scales, the unfused path
        assert calls == ["proj"]
        # Calibration goes through the unfused path, where the second linear sees the GEGLU output it scales.
        assert calibrate_static_scales(static_layers([fused]), lambda: fused(x)) == 2
        assert calls == ["proj", "proj"]
        fused(x)  # calibrated: the fused op, proj's forward not called
    assert calls == ["proj", "proj"]


def test_only_static_fp8_geglu_feed_forwards_fuse() -> None:
    assert fusable(fp8_feed_forward())
    assert not fusable(FeedForward(32, activation_fn="geglu"))  # bf16 linears
    assert not fusable(FeedForward(32, activation_fn="geglu-approximate"))  # gelu's sigmoid approximation
    assert not fusable(FeedForward(32, activation_fn="gelu"))
    narrow = FeedForward(32, activation_fn="geglu", inner_dim=40)  # N = 40: TMA's rows need multiples of 16
    narrow.net[0].proj = Float8Linear(narrow.net[0].proj, "static")
    narrow.net[2] = Float8Linear(narrow.net[2], "static")
    assert not fusable(narrow)
    dynamic = FeedForward(32, activation_fn="geglu")
    dynamic.net[0].proj = Float8Linear(dynamic.net[0].proj, "row-wise")
    dynamic.net[2] = Float8Linear(dynamic.net[2], "row-wise")
    assert not fusable(dynamic)
    with pytest.raises(ValueError, match="not a static-fp8 GEGLU feed-forward"):
        Fp8GegluFeedForward(FeedForward(32, activation_fn="geglu"))
    holder = nn.Sequential(fp8_feed_forward(), nn.Linear(4, 4))
    assert fuse_geglu_feed_forwards(holder) == 1 and isinstance(holder[0], Fp8GegluFeedForward)


def test_the_op_compiles_as_one_opaque_call_and_matches_eager() -> None:
    """Under torch.compile the fused matmul is the custom op (its fake implementation gives the shape and e4m3
    dtype); the quantization before it is ordinary tensor code. aot_eager: no C++ compiler needed."""
    from torch._dynamo.testing import CompileCounterWithBackend

    ff = fp8_feed_forward(seed=2)
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16)
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        calibrate_static_scales(static_layers([ff]), lambda: ff(x))
        fused = Fp8GegluFeedForward(ff)
        compiled = torch.compile(fused, backend=counter, fullgraph=True)
        assert torch.equal(compiled(x), fused(x))
    assert counter.frame_count == 1
    assert "imagesmith.fp8_geglu" in counter.graphs[0].code


def test_the_engine_fuses_every_unet_feed_forward_after_calibrating(tiny_settings: Settings) -> None:
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=10, seed=5)
    fp8 = tiny_settings.with_changes(fp8=True, encode_ahead=False, warmup_sizes="64x64")
    unfused = Engine.start(fp8)
    fused = Engine.start(fp8.with_changes(fp8_fused_geglu=True))
    lever = next(lever for lever in fused.levers if lever.startswith("fp8 GEGLU"))
    unets = [fused.models.base.unet, fused.models.refiner.unet]
    swapped = [m for unet in unets for m in unet.modules() if isinstance(m, Fp8GegluFeedForward)]
    assert int(lever.rsplit(" x", 1)[1]) == len(swapped) > 0
    assert not any(type(m) is FeedForward for unet in unets for m in unet.modules())
    # Calibrated at start-up through the unfused path: every feed-forward's second linear has its scale.
    assert all(m.out.input_scale is not None and m.proj.input_scale is not None for m in swapped)
    unfused_calls: list[int] = []
    for module in swapped:  # the first linear's own forward runs only on the unfused path
        module.proj.register_forward_hook(lambda *_: unfused_calls.append(1))
    a = np.asarray(unfused.generate(request).images[0]).astype(float)
    b = np.asarray(fused.generate(request).images[0]).astype(float)
    assert not unfused_calls  # every feed-forward ran the fused op
    psnr = 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12))
    # The same picture (on the CPU in fp32 the same arithmetic: no bf16 product to round).
    assert psnr > 40, psnr
