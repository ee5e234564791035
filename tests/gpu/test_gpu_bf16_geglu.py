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


def test_the_compiled_engine_with_fused_geglu_matches_the_eager_engine(tiny_settings: Settings) -> None:
    request = GenerationRequest(prompt="x", width=128, height=128, num_inference_steps=10, seed=4)
    eager = Engine.start(tiny_settings.with_changes(device="cuda"))
    fused = Engine.start(
        tiny_settings.with_changes(device="cuda", compile="reduce-overhead", fused_geglu=True)
    )
    assert any("first bf16 matmul" in lever for lever in fused.levers), fused.levers
    a = np.asarray(eager.generate(request).images[0]).astype(float)
    b = np.asarray(fused.generate(request).images[0]).astype(float)
    psnr = 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12))
    assert psnr > 30, psnr
    assert len(compiled_modules(fused)) == 3, fused.levers  # not the engine's eager fallback
