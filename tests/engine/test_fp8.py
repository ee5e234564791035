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
from imagesmith.engine.fp8 import E4M3_MAX, Float8Linear
from imagesmith.schemas import GenerationRequest


@pytest.mark.parametrize("rowwise", [True, False])
def test_an_fp8_linear_stays_within_e4m3_rounding_of_its_layer(rowwise: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 128)
    quantized = Float8Linear(layer, rowwise)
    assert quantized.weight_fp8.dtype == torch.float8_e4m3fn
    assert quantized.weight_scale.shape == ((1, 128) if rowwise else (1, 1))
    x = torch.randn(2, 50, 64)
    x[0, 0] = 0.0  # an all-zero row must not divide by zero
    with torch.no_grad():
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
        rowwise_error = float((Float8Linear(layer, True)(x)[1] - small_row).norm() / small_row.norm())
        tensor_error = float((Float8Linear(layer, False)(x)[1] - small_row).norm() / small_row.norm())
    assert rowwise_error < 0.06 < tensor_error


def test_the_fp8_engine_converts_only_transformer_linears_and_stays_close(tiny_settings: Settings) -> None:
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=10, seed=5)
    plain = Engine.start(tiny_settings)
    fp8 = Engine.start(tiny_settings.with_changes(fp8=True, encode_ahead=False))  # its one lever: fp8
    assert len(fp8.levers) == 1 and fp8.levers[0].startswith("fp8 transformer linears x")
    converted = [
        name for name, module in fp8.models.base.unet.named_modules() if isinstance(module, Float8Linear)
    ]
    assert converted and all(".attentions." in f".{name}" for name in converted)
    assert int(fp8.levers[0].split("x")[-1].split()[0]) == len(converted) + sum(
        isinstance(m, Float8Linear) for m in fp8.models.refiner.unet.modules()
    )
    assert isinstance(fp8.models.base.unet.time_embedding.linear_1, nn.Linear)  # few rows: left alone
    a = np.asarray(plain.generate(request).images[0]).astype(float)
    b = np.asarray(fp8.generate(request).images[0]).astype(float)
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert 20 < psnr < 80  # changed (it is lossy), yet the same picture


def test_fp8_applies_after_fusing_so_the_fused_projections_are_quantized(tiny_settings: Settings) -> None:
    engine = Engine.start(tiny_settings.with_changes(fp8=True, fuse_qkv=True))
    assert engine.levers[0] == "fused QKV" and engine.levers[1].startswith("fp8")
    attention = [m for m in engine.models.base.unet.modules() if type(m).__name__ == "Attention"]
    self_attention = [m for m in attention if not m.is_cross_attention]
    assert self_attention and all(isinstance(m.to_qkv, Float8Linear) for m in self_attention)
    image = engine.generate(
        GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=10, seed=5)
    ).images[0]
    assert np.asarray(image).std() > 0
