"""On a CUDA GPU: a compiled VAE decoder with its attention routed (IMAGESMITH_DECODER_MATH_ATTENTION) runs no
attention kernel for latents up to 128x128 (its attention became matmuls and a softmax), runs the kernel past
them, and decodes the picture the fused kernel gives, within bf16 rounding."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imagesmith.engine.decode import decode_latents
from imagesmith.engine.decoder_attention import MAX_POSITIONS, route_decoder_attention
from imagesmith.engine.tiny import build_tiny_sdxl
from tests.dynamo_reset import reset_dynamo
from tests.kernel_kinds_module import load_kernel_kinds

pytestmark = pytest.mark.gpu


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(255**2 / mse) if mse else math.inf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_decoders_attention_becomes_matmuls_up_to_the_bound_and_keeps_the_picture(
    tmp_path: Path,
) -> None:
    from diffusers import AutoencoderKL
    from torch.profiler import ProfilerActivity, profile

    base, _ = build_tiny_sdxl(tmp_path / "tiny")
    vae: Any = AutoencoderKL.from_pretrained(base / "vae")
    vae = vae.to("cuda", torch.bfloat16).eval()
    vae.fuse_qkv_projections()  # as the engine's fuse_qkv lever leaves it
    generator = torch.Generator("cuda").manual_seed(3)
    small = torch.randn(1, 4, 32, 32, device="cuda", generator=generator)
    large = torch.randn(1, 4, 136, 128, device="cuda", generator=generator)
    assert small.shape[-1] * small.shape[-2] <= MAX_POSITIONS < large.shape[-1] * large.shape[-2]
    device = torch.device("cuda")
    # benchmarks/kernel_kinds.py's classifier (Triton's kernels first, so inductor's softmax is not attention).
    kernel_kinds = load_kernel_kinds()

    def decode(latents: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
        decode_latents(vae, latents, torch.bfloat16, False, device)  # compiles, when this size needs it
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            images, _ = decode_latents(vae, latents, torch.bfloat16, False, device)
        kinds = {kernel_kinds.kind_of(event.key) for event in prof.key_averages()}
        return torch.from_numpy(np.stack([np.asarray(image) for image in images])), kinds

    try:
        reset_dynamo()
        vae.decoder.compile(fullgraph=True)
        plain, plain_kinds = decode(small)
        reset_dynamo()
        assert route_decoder_attention(vae.decoder) == 1
        vae.decoder.compile(fullgraph=True)
        matmuls, math_kinds = decode(small)
        _, large_kinds = decode(large)
    finally:
        vae.decoder._compiled_call_impl = None
        reset_dynamo()
    assert "attention" in plain_kinds  # the fused kernel ran unrouted...
    assert "attention" not in math_kinds and "matmul" in math_kinds  # ...matmuls instead routed...
    assert "attention" in large_kinds  # ...and the kernel again past the bound
    assert psnr(matmuls, plain) > 40  # bf16 rounding's size (run 80 at full size: 51.5 dB)
