"""The UNets' attention through FlashAttention-4's Hopper kernel (IMAGESMITH_ATTENTION_BACKEND=fa4, opt-in).

Why: cuDNN's attention, torch's fastest for SDXL's shapes (head dimension 64), is 4.5 ms of a ~30 ms compiled
base UNet call on an H100 (run 91 in docs/benchmarks.md), and each of its calls queues a memset inside the CUDA
graphs (140 a base call). FlashAttention-4 (the `flash-attn-4` package: Python, compiled on first use by NVIDIA's
CuTe DSL) has a Hopper forward kernel that torch 2.11 does not ship. benchmarks/attention_fa4.py times both on
every shape; docs/benchmarks.md, session 47, says what it gave.

How it is wired:
- `imagesmith::fa4_attention` is a torch custom op, so torch.compile traces one opaque call per attention and
  inductor runs it as an extern kernel inside the UNets' CUDA graphs. Its CPU kernel is torch's own attention,
  which lets the processor's wiring be tested without a GPU.
- `FA4AttentionProcessor` stands in for diffusers' AttnProcessor2_0 and FusedAttnProcessor2_0 on the UNets' plain
  attention blocks (tokens in, no mask, no norms). It hands the kernel (batch, tokens, heads, 64) views of the
  projections' own output, the layout FA4 reads, so nothing is transposed or copied.
- `kernel_fault` compiles and runs the kernel once at start-up against fp32 attention; the engine refuses to
  start on a GPU where it fails rather than fail inside a warm-up's CUDA-graph capture.

The arithmetic is softmax(QK^T / 8) V with bf16 operands and fp32 accumulation, as in cuDNN's kernel: the images
differ from cuDNN's by bf16 rounding only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imagesmith.engine.attention import plain_sdpa_block, qkv_projections
from imagesmith.engine.kernel_check import output_fault

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'flash-attn-4==4.0.0b40' (Hopper GPUs, CUDA 12.9 or later)"
SETTING = "IMAGESMITH_ATTENTION_BACKEND"


@torch.library.custom_op("imagesmith::fa4_attention", mutates_args=(), device_types="cuda")
def fa4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(QK^T * scale) V of (batch, tokens, heads, head_dim) tensors; the output is a new contiguous
    (batch, queries, heads, head_dim) tensor."""
    from flash_attn.cute.interface import _flash_attn_fwd  # imported on first use: a GPU-only package

    return _flash_attn_fwd(query, key, value, softmax_scale=scale)[0]


@fa4_attention.register_kernel("cpu")
def _cpu_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's attention on the CPU, same layout in and out: the processor's wiring runs and is tested there."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2).contiguous()


@fa4_attention.register_fake
def _fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


class FA4AttentionProcessor:
    """diffusers' AttnProcessor2_0 and FusedAttnProcessor2_0 for a UNet transformer block's attention only
    (tokens in, no mask, group norm, spatial norm or q/k norms), its attention through `fa4_attention`."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError(
                "the FA4 attention processor takes (batch, tokens, channels) without a mask only"
            )
        residual = hidden_states
        query, key, value = qkv_projections(attn, hidden_states, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (batch, tokens, heads, head_dim) views of the projections' memory: FA4's own layout.
        query, key, value = (t.unflatten(-1, (attn.heads, head_dim)) for t in (query, key, value))
        # head_dim^-1/2 as diffusers' processors have SDPA use (they ignore attn.scale).
        hidden_states = fa4_attention(query, key, value, head_dim**-0.5).flatten(2)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # the projection, then dropout
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def routable(attn: Any) -> bool:
    """Whether FA4AttentionProcessor computes what this attention's processor computes: diffusers' two plain
    SDPA processors on a block with no norms of its own and a head dimension FA4 takes (SDXL's is 64)."""
    head_dim = attn.inner_dim // attn.heads
    # FA4's range on Hopper and Blackwell alike: 8-128 wide, in whole 16-byte rows of bf16.
    fits = 8 <= head_dim <= 128 and head_dim % 8 == 0
    return plain_sdpa_block(attn) and attn.group_norm is None and fits


def route_unet_attention(unet: Any) -> int:
    """Give a UNet's attention blocks FA4AttentionProcessor, after any QKV fusion (whose processor it replaces)
    and before the UNet is compiled; returns how many. Those it cannot stand for keep theirs, logged."""
    from diffusers.models.attention_processor import Attention

    routed = 0
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        if isinstance(module.processor, FA4AttentionProcessor):
            routed += 1  # routed by an earlier call (the levers applied again to the same models)
        elif routable(module):
            processor: Any = FA4AttentionProcessor()  # diffusers types set_processor's argument as its own
            module.set_processor(processor)
            routed += 1
        else:
            log.warning("UNet attention %s keeps %s", name, type(module.processor).__name__)
    return routed


def keep_kernels_in(folder: Path) -> None:
    """FA4 compiles each kernel on its first use in a process (seconds each); kept on disk, a restart loads them,
    as inductor's own cache keeps the UNets' graphs. flash_attn.cute reads these variables once, when it is first
    imported, so this runs before anything imports it; values the user set win."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(folder))


def kernel_fault(device: torch.device | str) -> str | None:
    """Run the kernel once on `device` (FA4 compiles it there, seconds) at a small shape of SDXL's head
    dimension, self- and cross-attention-like, against fp32 attention on the CPU; None where it agrees within
    bf16 rounding, else what went wrong, in a line."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 200, 3, 64, generator=generator).to(torch.bfloat16)
    key, value = (torch.randn(2, 77, 3, 64, generator=generator).to(torch.bfloat16) for _ in range(2))
    expected = _cpu_attention(query.float(), key.float(), value.float(), 0.125)
    return output_fault(
        lambda: fa4_attention(query.to(device), key.to(device), value.to(device), 0.125),
        expected,
        "fp32 attention",
    )


def start_problem(device: str) -> str | None:
    """What stops FA4 serving on `device` (its kernel_fault), said with the fix; None where it runs. A start
    refuses with it and doctor prints it."""
    fault = kernel_fault(device)
    if fault is None:
        return None
    return f"FlashAttention-4 failed its check on {device} ({fault}): {INSTALL_HINT}, or set {SETTING}=auto"
