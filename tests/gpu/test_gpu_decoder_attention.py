"""On a CUDA GPU: a compiled VAE decoder traced under IMAGESMITH_DECODER_MATH_ATTENTION runs no attention kernel
(its attention became matmuls and a softmax) and decodes the picture the memory-efficient kernel gives, within
bf16 rounding."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from imagesmith.engine.decode import decode_latents
from imagesmith.engine.decoder_attention import decoder_attention
from imagesmith.engine.tiny import build_tiny_sdxl

pytestmark = pytest.mark.gpu


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(255**2 / mse) if mse else math.inf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_decoders_attention_becomes_matmuls_and_keeps_the_picture(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    from torch.profiler import ProfilerActivity, profile

    # Each trace compiles afresh: the caches key on the graph, which holds one attention call either way.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    base, _ = build_tiny_sdxl(tmp_path / "tiny")
    vae = AutoencoderKL.from_pretrained(base / "vae").to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 4, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    device = torch.device("cuda")

    def decode(math_attention: bool) -> tuple[torch.Tensor, set[str]]:
        torch._dynamo.reset()
        vae.decoder.compile(fullgraph=True)
        with decoder_attention(math_attention):
            decode_latents(vae, latents, torch.bfloat16, False, device)  # compiles
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                images, _ = decode_latents(vae, latents, torch.bfloat16, False, device)
        kernels = {event.key for event in prof.key_averages()}
        return torch.from_numpy(np.stack([np.asarray(image) for image in images])), kernels

    plain, plain_kernels = decode(False)
    matmuls, math_kernels = decode(True)

    def attention_kernels(names: set[str]) -> set[str]:
        return {name for name in names if "fmha" in name.lower() or "attention" in name.lower()}

    assert attention_kernels(plain_kernels)  # the fused kernel ran without the lever...
    assert not attention_kernels(math_kernels)  # ...and not with it
    assert psnr(matmuls, plain) > 40  # bf16 rounding's size (run 80 at full size: 51.5 dB)
