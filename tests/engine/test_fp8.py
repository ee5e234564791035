"""fp8 linears (IMAGESMITH_FP8): quantized for real, close to the layer they replace, only where meant to be.

On the CPU the product runs in fp32 on the same e4m3 operands (there is no fp8 matmul there); the GPU test in
tests/gpu checks that torch._scaled_mm gives that same product.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.fp8 import (
    CALIBRATION_HEADROOM,
    E4M3_MAX,
    Float8Linear,
    calibrate_static_scales,
    static_layers,
)
from imagesmith.engine.fp8_calibration import calibrate_fp8
from imagesmith.schemas import GenerationRequest


@pytest.mark.parametrize("scaling", ["row-wise", "per-tensor", "static"])
def test_an_fp8_linear_stays_within_e4m3_rounding_of_its_layer(scaling: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 128)
    quantized = Float8Linear(layer, scaling)
    assert quantized.weight_fp8.dtype == torch.float8_e4m3fn
    assert quantized.weight_scale.shape == ((1, 128) if scaling == "row-wise" else (1, 1))
    x = torch.randn(2, 50, 64)
    x[0, 0] = 0.0  # an all-zero row must not divide by zero
    with torch.no_grad():
        if scaling == "static":
            calibrate_static_scales([quantized], lambda: quantized(torch.randn(3, 64)))
        expected, got = layer(x), quantized(x)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    error = float((got - expected).norm() / expected.norm())
    # e4m3 keeps 3 mantissa bits: unit roundoff 2^-4 on each operand; errors average out over the sums.
    assert 1e-3 < error < 0.06


def test_rowwise_scales_keep_a_small_row_accurate_beside_a_large_one() -> None:
    """Why row-wise: one outlier row must not flush the others' values to zero."""
    torch.manual_seed(1)
    layer = nn.Linear(32, 32, bias=False)
    x = torch.randn(2, 32)
    x[1] *= 1e-4 * E4M3_MAX  # a row far smaller than the other
    x[0] *= 1e3
    with torch.no_grad():
        small_row = layer(x)[1]
        rowwise_error = float((Float8Linear(layer, "row-wise")(x)[1] - small_row).norm() / small_row.norm())
        tensor_error = float((Float8Linear(layer, "per-tensor")(x)[1] - small_row).norm() / small_row.norm())
    assert rowwise_error < 0.06 < tensor_error


def test_the_fp8_engine_converts_only_transformer_linears_and_stays_close(tiny_settings: Settings) -> None:
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=10, seed=5)
    plain = Engine.start(tiny_settings)
    # Its only levers: fp8, and its calibration at start-up (64x64: the tiny model's first warm-up size).
    fp8 = Engine.start(
        tiny_settings.with_changes(
            fp8=True, encode_ahead=False, warmup_sizes="64x64", empty_negative_shortcut=False
        )
    )
    assert len(fp8.levers) == 2 and fp8.levers[0].startswith("fp8 transformer linears x")
    assert fp8.levers[0].endswith("static scales (lossy)")
    converted = [
        name for name, module in fp8.models.base.unet.named_modules() if isinstance(module, Float8Linear)
    ]
    assert converted and all(".attentions." in f".{name}" for name in converted)
    assert int(fp8.levers[0].split(" x")[-1].split(",")[0]) == len(converted) + sum(
        isinstance(m, Float8Linear) for m in fp8.models.refiner.unet.modules()
    )
    assert isinstance(fp8.models.base.unet.time_embedding.linear_1, nn.Linear)  # few rows: left alone
    a = np.asarray(plain.generate(request).images[0]).astype(float)
    b = np.asarray(fp8.generate(request).images[0]).astype(float)
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert 20 < psnr < 80  # changed (it is lossy), yet the same picture


def test_fp8_applies_after_fusing_so_the_fused_projections_are_quantized(tiny_settings: Settings) -> None:
    engine = Engine.start(
        tiny_settings.with_changes(
            fp8=True, fuse_qkv=True, warmup_sizes="64x64", empty_negative_shortcut=False
        )
    )
    assert engine.levers[0] == "fused QKV" and engine.levers[1].startswith("fp8")
    attention = [m for m in engine.models.base.unet.modules() if type(m).__name__ == "Attention"]
    self_attention = [m for m in attention if not m.is_cross_attention]
    assert self_attention and all(isinstance(m.to_qkv, Float8Linear) for m in self_attention)
    image = engine.generate(
        GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=10, seed=5)
    ).images[0]
    assert np.asarray(image).std() > 0


def test_a_static_scale_is_the_largest_input_seen_with_headroom_and_clips_beyond_it() -> None:
    torch.manual_seed(2)
    layer = Float8Linear(nn.Linear(32, 16, bias=False), "static")
    x = torch.randn(4, 32)
    x[1, 3] = 5.0  # the largest input the calibration sees
    with torch.no_grad():
        assert calibrate_static_scales([layer], lambda: layer(x)) == 1
        assert layer.input_scale is not None and layer.calibration_amax is None
        assert float(layer.input_scale) == pytest.approx(5.0 * CALIBRATION_HEADROOM / E4M3_MAX)
        # Within the headroom: as close as e4m3 rounding allows.
        louder = x * 1.9
        dense = nn.functional.linear(louder, layer.weight_fp8.float() * layer.weight_scale.reshape(-1, 1))
        error = float((layer(louder) - dense).norm() / dense.norm())
        assert error < 0.06
        # Past it: saturated at e4m3's largest value, finite, never NaN or inf.
        far = torch.full((1, 32), 1e4)
        assert torch.isfinite(layer(far)).all()
        clipped = nn.functional.linear(
            torch.full((1, 32), 5.0 * CALIBRATION_HEADROOM),
            layer.weight_fp8.float() * layer.weight_scale.reshape(-1, 1),
        )
        assert torch.allclose(layer(far), clipped, rtol=1e-5, atol=1e-5)


def test_a_static_layer_the_calibration_never_reached_keeps_scaling_per_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reached, missed = (Float8Linear(nn.Linear(32, 32), "static") for _ in range(2))
    with torch.no_grad():
        assert calibrate_static_scales([reached, missed], lambda: reached(torch.randn(2, 32))) == 1
        assert reached.input_scale is not None and missed.input_scale is None
        y = missed(torch.randn(2, 32) * 1e3)  # per-call scale: no clipping of an input this large
    assert torch.isfinite(y).all() and float(y.abs().max()) > 100
    assert "reached 1 of 2 layers" in caplog.text


def test_the_calibration_runs_eager_and_puts_the_compiled_calls_back(tiny_settings: Settings) -> None:
    """A compile during calibration would bake the calibrating layers' extra reduction into the graphs."""
    engine = Engine.start(tiny_settings.with_changes(fp8=True, encode_ahead=False, warmup_sizes="64x64"))
    layers = static_layers([engine.models.base.unet, engine.models.refiner.unet])
    assert layers and all(layer.input_scale is not None for layer in layers)
    before = {id(layer): float(layer.input_scale) for layer in layers}  # type: ignore[arg-type]

    def compiled_call(*args: object, **kwargs: object) -> None:
        raise AssertionError("the calibration called a compiled module")

    for layer in layers:
        layer.input_scale = torch.full((1, 1), 123.0)  # stale: the calibration must learn them again
    unet = engine.models.base.unet
    unet._compiled_call_impl = compiled_call
    try:
        assert calibrate_fp8(engine, tiny_settings.with_changes(warmup_sizes="64x64")) is not None
        assert unet._compiled_call_impl is compiled_call
    finally:
        unet._compiled_call_impl = None
    # The same generation again: the same scales, learned again from the inputs, the stale ones gone.
    assert {id(layer): float(layer.input_scale) for layer in layers} == pytest.approx(before)  # type: ignore[arg-type]


def test_a_compiled_static_layer_reads_its_scale_as_an_input_not_a_constant() -> None:
    """The calibrated scale is a buffer, so torch.compile passes it into the graph like a weight: a scale baked in
    as a constant would make the compile cache's key depend on the calibration (engine/fp8.py). Traced through
    dynamo and AOT autograd (the aot_eager backend: no C++ compiler needed), fullgraph as the engine compiles."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(3)
    layer = Float8Linear(nn.Linear(32, 16), "static")
    x = torch.randn(4, 32)
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        calibrate_static_scales([layer], lambda: layer(x))
        compiled = torch.compile(layer, backend=counter, fullgraph=True)
        before = compiled(x)
        assert torch.equal(before, layer(x))
        assert layer.input_scale is not None
        layer.input_scale.mul_(0.1)  # a new calibration, in place (now clipping): the same graph must read it
        after = compiled(x)
    assert torch.equal(after, layer(x)) and not torch.equal(after, before)
    assert counter.frame_count == 1  # one graph, not recompiled for the new value
