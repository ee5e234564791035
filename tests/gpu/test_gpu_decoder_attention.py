"""On a CUDA GPU: a compiled VAE decoder traced under IMAGESMITH_DECODER_MATH_ATTENTION runs no attention kernel
(its attention became matmuls and a softmax) and decodes the picture the fused kernel gives, within bf16
rounding."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from imagesmith.engine.decode import decode_latents
from imagesmith.engine.decoder_attention import decoder_attention
from imagesmith.engine.tiny import build_tiny_sdxl
from tests.dynamo_reset import reset_dynamo
from tests.kernel_kinds_module import load_kernel_kinds

pytestmark = pytest.mark.gpu


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(255**2 / mse) if mse else math.inf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_decoders_attention_becomes_matmuls_and_keeps_the_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import AutoencoderKL
    from torch.profiler import ProfilerActivity, profile

    # Each trace compiles afresh: the caches key on the graph, which holds one attention call either way.
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    base, _ = build_tiny_sdxl(tmp_path / "tiny")
    vae: Any = AutoencoderKL.from_pretrained(base / "vae")
    vae = vae.to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 4, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    device = torch.device("cuda")
    # benchmarks/kernel_kinds.py's classifier (Triton's kernels first, so inductor's softmax is not attention).
    kernel_kinds = load_kernel_kinds()

    def decode(math_attention: bool) -> tuple[torch.Tensor, set[str]]:
        reset_dynamo()
        vae.decoder.compile(fullgraph=True)
        # Without the lever, the memory-efficient kernel, as the full-size VAE's 512-wide head gets in service
        # (the tiny VAE's 16-wide head would go to cuDNN's or flash's kernel).
        kernel = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
        with decoder_attention(math_attention) if math_attention else kernel:
            decode_latents(vae, latents, torch.bfloat16, False, device)  # compiles
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                images, _ = decode_latents(vae, latents, torch.bfloat16, False, device)
        kinds = {kernel_kinds.kind_of(event.key) for event in prof.key_averages()}
        return torch.from_numpy(np.stack([np.asarray(image) for image in images])), kinds

    try:
        plain, plain_kinds = decode(False)
        matmuls, math_kinds = decode(True)
    finally:
        vae.decoder._compiled_call_impl = None
        reset_dynamo()
    assert "attention" in plain_kinds  # the fused kernel ran without the lever...
    assert "attention" not in math_kinds and "matmul" in math_kinds  # ...and matmuls instead with it
    assert psnr(matmuls, plain) > 40  # bf16 rounding's size (run 80 at full size: 51.5 dB)
