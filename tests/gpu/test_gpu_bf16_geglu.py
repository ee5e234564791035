"""On a CUDA GPU: the bf16 fused GEGLU kernel (engine/bf16_geglu_kernel.py) against the op's fp32 path, and the
compiled tiny engine with IMAGESMITH_FUSED_GEGLU (the kernel in a custom op, autotuned on its first call, replayed
in CUDA graphs) against the eager engine without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.fast import compiled_modules
from imagesmith.schemas import GenerationRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="needs a Hopper GPU (the kernel's TMA reads)",
    ),
]


@pytest.mark.parametrize(
    ("m", "k", "n", "bias"), [(2048, 1280, 5120, True), (300, 640, 2560, True), (50, 96, 80, False)]
)
def test_the_bf16_fused_geglu_kernel_computes_the_cpu_reference(m: int, k: int, n: int, bias: bool) -> None:
    """Rows that are no multiple of a tile, a K that is none of BLOCK_K and an N none of BLOCK_N (TMA's zero fill
    and clipped stores), no bias; an SDXL base shape at batch 2."""
    from imagesmith.engine.bf16_geglu import bf16_geglu, interleave_halves

    torch.manual_seed(m)
    x = torch.randn(m, k).to(torch.bfloat16)
    w = interleave_halves((torch.randn(2 * n, k) / k**0.5).to(torch.bfloat16))
    b = interleave_halves((torch.randn(2 * n) * 0.1).to(torch.bfloat16)) if bias else None
    expected = bf16_geglu(x, w, b).float()  # the CPU path: fp32 arithmetic, rounded to bf16 once
    got = bf16_geglu(x.cuda(), w.cuda(), None if b is None else b.cuda())
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert float((got.float().cpu() - expected).norm() / expected.norm()) < 5e-3  # bf16 rounding only


@pytest.mark.parametrize(("m", "k", "n"), [(2048, 1280, 5120), (50, 96, 80)])
def test_the_kernel_with_the_layer_norm_computes_the_cpu_reference(m: int, k: int, n: int) -> None:
    """Rows with a mean and a spread far from 0 and 1, which the kernel's moments must remove."""
    from torch import nn

    from imagesmith.engine.bf16_geglu import bf16_norm_geglu, fold_layer_norm, interleave_halves

    torch.manual_seed(k)
    x = (torch.randn(m, k) * 4 + 2).to(torch.bfloat16)
    norm = nn.LayerNorm(k)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.3)
    weight, bias, sums = (
        interleave_halves(t)
        for t in fold_layer_norm(
            (torch.randn(2 * n, k) / k**0.5).to(torch.bfloat16), torch.randn(2 * n), norm
        )
    )
    expected = bf16_norm_geglu(x, weight, bias, sums, norm.eps).float()
    got = bf16_norm_geglu(x.cuda(), weight.cuda(), bias.cuda(), sums.cuda(), norm.eps)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert float((got.float().cpu() - expected).norm() / expected.norm()) < 5e-3


@pytest.mark.parametrize("with_norm", [False, True])
def test_the_compiled_engine_with_fused_geglu_matches_the_eager_engine(
    tiny_settings: Settings, with_norm: bool
) -> None:
    request = GenerationRequest(prompt="x", width=128, height=128, num_inference_steps=10, seed=4)
    eager = Engine.start(tiny_settings.with_changes(device="cuda"))
    fused = Engine.start(
        tiny_settings.with_changes(
            device="cuda", compile="reduce-overhead", fused_geglu=True, fused_geglu_norm=with_norm
        )
    )
    assert any("first bf16 matmul" in lever for lever in fused.levers), fused.levers
    assert any("layer norm before it" in lever for lever in fused.levers) is with_norm
    a = np.asarray(eager.generate(request).images[0]).astype(float)
    b = np.asarray(fused.generate(request).images[0]).astype(float)
    psnr = 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12))
    assert psnr > 30, psnr
    assert len(compiled_modules(fused)) == 3, fused.levers  # not the engine's eager fallback
