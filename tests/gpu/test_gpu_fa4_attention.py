"""On a Hopper GPU with flash-attn-4 installed: FA4's kernel passes the engine's start-up check, computes SDXL's
attention shapes within bf16 rounding of cuDNN's, and a UNet routed through it, compiled with CUDA graphs as the
service runs it, gives what the same UNet gives with diffusers' own processors."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from imagesmith.engine.fa4_attention import fa4_attention, kernel_fault, route_unet_attention
from imagesmith.engine.tiny import build_tiny_sdxl
from tests.dynamo_reset import reset_dynamo
from tests.unet_call import unet_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
        reason="needs a Hopper GPU",
    ),
    pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn-4"),
]


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_the_kernel_passes_the_start_up_check() -> None:
    assert kernel_fault("cuda") is None


@pytest.mark.parametrize(("heads", "queries", "keys"), [(10, 4096, 4096), (20, 1024, 1024), (20, 1024, 77)])
def test_sdxl_shapes_match_cudnns_attention_within_bf16_rounding(heads: int, queries: int, keys: int) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, queries, heads, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    k, v = (
        torch.randn(2, keys, heads, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
        for _ in "kv"
    )
    got = fa4_attention(q, k, v, 0.125)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    exact = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    # Both round to bf16 (~3e-3 relative); neither may be further from the exact result than twice the other.
    assert relative_l2(got, exact) < 5e-3
    assert relative_l2(got, exact) < 2 * relative_l2(cudnn, exact)


def test_a_routed_unet_compiled_with_cuda_graphs_matches_diffusers_processors(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    base, _ = build_tiny_sdxl(tmp_path / "tiny")
    unet: Any = UNet2DConditionModel.from_pretrained(base / "unet")
    unet = unet.to("cuda", torch.bfloat16).eval()
    unet.fuse_qkv_projections()
    args, kwargs = unet_inputs(unet.config, rows=2)
    args, kwargs = _to_cuda((args, kwargs))
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample.clone()
        assert route_unet_attention(unet) > 0
        try:
            reset_dynamo()
            compiled = torch.compile(unet, fullgraph=True, mode="reduce-overhead")
            for _ in range(3):  # warm-up, recording, then a replay
                got = compiled(*args, **kwargs).sample.clone()
        finally:
            reset_dynamo()
    assert relative_l2(got, expected) < 2e-2  # bf16 through a tiny random UNet, as the other compiled tests


def _to_cuda(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("cuda", torch.bfloat16 if value.is_floating_point() and value.ndim else value.dtype)
    if isinstance(value, dict):
        return {key: _to_cuda(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_cuda(item) for item in value)
    return value
