"""The UNets' attention through FlashAttention-4 (IMAGESMITH_ATTENTION_BACKEND=fa4, engine/fa4_attention.py):
the processor computes what diffusers' processors compute (fused projections or not, self- and cross-attention),
which blocks it takes, the op under torch.compile, and a start that refuses where the kernel cannot run. Off the
GPU the op runs torch's attention in the kernel's layout; the kernel itself: tests/gpu/test_gpu_fa4_attention.py."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from unet_call import unet_inputs

from imagesmith.config import AttentionBackendChoice, Settings
from imagesmith.engine import Engine
from imagesmith.engine.attention import priority_for
from imagesmith.engine.fa4_attention import (
    FA4AttentionProcessor,
    fa4_attention,
    keep_kernels_in,
    routable,
    route_unet_attention,
)
from imagesmith.engine.fast import apply_speed_levers
from imagesmith.engine.hardware import DeviceInfo, plan_hardware


def attention_blocks(unet: torch.nn.Module) -> list[Attention]:
    return [m for m in unet.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("fused", [False, True])
def test_a_unet_routed_through_the_processor_gives_the_same_output(
    tiny_settings: Settings, fused: bool
) -> None:
    # The processors as diffusers gives them: the engine routes FA4 before the empty-negative shortcut wraps them.
    unet = Engine.start(
        tiny_settings.with_changes(warmup=False, empty_negative_shortcut=False)
    ).models.base.unet
    if fused:
        unet.fuse_qkv_projections()
    blocks = attention_blocks(unet)
    assert any(b.is_cross_attention for b in blocks) and any(not b.is_cross_attention for b in blocks)
    args, kwargs = unet_inputs(unet.config, rows=2)
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
        assert route_unet_attention(unet) == len(blocks)
        assert all(isinstance(b.processor, FA4AttentionProcessor) for b in blocks)
        got = unet(*args, **kwargs).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert route_unet_attention(unet) == len(blocks)  # again: counted, not wrapped twice


def test_the_op_takes_and_returns_tokens_first_and_matches_sdpa() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 33, 3, 64), torch.randn(2, 7, 3, 64), torch.randn(2, 7, 3, 64)
    out = fa4_attention(q, k, v, 0.125)
    assert out.shape == (2, 33, 3, 64) and out.is_contiguous()
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_blocks_it_cannot_stand_for_keep_their_processor() -> None:
    plain = Attention(query_dim=128, heads=2, dim_head=64)
    plain.set_processor(AttnProcessor2_0())
    assert routable(plain)
    normed = Attention(query_dim=128, heads=2, dim_head=64, norm_num_groups=8)  # the VAE's: a group norm
    normed.set_processor(AttnProcessor2_0())
    assert not routable(normed)
    wide = Attention(query_dim=512, heads=1, dim_head=512)  # a head FA4 has no kernel for
    wide.set_processor(AttnProcessor2_0())
    assert not routable(wide)


def test_the_routed_unet_compiles_in_one_graph(tiny_settings: Settings) -> None:
    """The op is opaque to torch.compile through its registered shape: no graph break around any attention."""
    unet = Engine.start(tiny_settings.with_changes(warmup=False)).models.base.unet
    unet.fuse_qkv_projections()
    route_unet_attention(unet)
    args, kwargs = unet_inputs(unet.config, rows=2)
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
        got = compiled(*args, **kwargs).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_users_own_kernel_cache_settings_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", raising=False)
    keep_kernels_in(tmp_path)
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "0"
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path)


def test_fa4_keeps_torchs_order_for_the_rest() -> None:
    assert priority_for("fa4") is None  # the VAE's attention: torch's choice


def test_a_cuda_plan_carries_fa4_and_a_cpu_plan_ignores_it(tiny_settings: Settings) -> None:
    settings = tiny_settings.with_changes(attention_backend=AttentionBackendChoice.FA4)
    cpu = plan_hardware(DeviceInfo(kind="cpu"), settings)
    assert cpu.attention == "auto"
    assert any("fa4 ignored" in reason for reason in cpu.reasons)
    hopper = DeviceInfo(kind="cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
    assert plan_hardware(hopper, settings).attention == "fa4"


def test_where_the_kernel_cannot_run_the_start_refuses_and_says_how_to_fix_it(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA plan on a machine whose torch has no CUDA (this one): the kernel's check fails, and the error names
    the setting and the two ways out instead of starting with another kernel than the one asked for."""
    for name in ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    engine = Engine.start(tiny_settings.with_changes(warmup=False))
    plan = dataclasses.replace(engine.plan, device="cuda", attention="fa4")
    with pytest.raises(RuntimeError) as raised:
        apply_speed_levers(engine.models.base, None, plan, tiny_settings)
    message = str(raised.value)
    assert "IMAGESMITH_ATTENTION_BACKEND=fa4" in message
    assert "pip install 'flash-attn-4" in message and "IMAGESMITH_ATTENTION_BACKEND=auto" in message
    assert not any(
        isinstance(b.processor, FA4AttentionProcessor) for b in attention_blocks(engine.models.base.unet)
    )
