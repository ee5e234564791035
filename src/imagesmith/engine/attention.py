"""Which fused kernel runs scaled_dot_product_attention (IMAGESMITH_ATTENTION_BACKEND).

'auto' leaves the choice to torch, and torch's choice depends on its build: torch 2.11 with cuDNN 9.19 on an
H200 runs cuDNN's attention first (it decides this lazily, at the first attention call, on Hopper and
Blackwell with a recent cuDNN; elsewhere flash attention comes first). Measured in docs/benchmarks.md, runs
19-23: on SDXL's shapes (head dim 64) cuDNN's kernel takes 4.5 ms of a compiled base UNet call where flash
takes 7.2 ms, so 'auto' is already the fast choice there. The setting pins the kernel where torch's default
differs (an older cuDNN, TORCH_CUDNN_SDPA_PREFERRED=0, another GPU) or for an A/B.

Every backend computes the same softmax(QK^T)V to within bf16 rounding. The chosen backend goes to the front
of torch's priority list and the others stay behind it: a shape it does not take (the VAE's single 512-wide
head) still runs on the next fused kernel instead of failing.

The choice must be in force whenever the UNets run, warm-up included: torch.compile records the kernel chosen
while it traces, so the engine enters `attention_priority` around every generation, and each choice keeps its
own compile cache (engine/fast.py, compile_cache_for).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
_FALLBACKS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def priority_for(choice: str) -> list[SDPBackend] | None:
    """The backend order for a plan's `attention` value; None keeps torch's own order ('auto', and 'fa4', whose
    processors call their kernel directly and leave SDPA to the VAE)."""
    if choice in ("auto", "fa4"):
        return None
    first = _BACKENDS[choice]
    return [first, *(backend for backend in _FALLBACKS if backend is not first)]


@contextmanager
def attention_priority(choice: str) -> Iterator[None]:
    """Run the body with `choice` tried first. The flags are process-wide, hence one generation at a time
    (the engine's lock) and restored on exit."""
    order = priority_for(choice)
    if order is None:
        yield
        return
    with sdpa_kernel(order, set_priority=True):
        yield


def qkv_projections(
    attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K and V of a diffusers Attention block, (batch, tokens, heads x head_dim) each, as its SDPA processors
    project them: keys and values from `context` (cross-attention) or from the tokens themselves, through the
    fused projections where fuse_qkv_projections made them (views of one matmul's output), else one at a time.
    For the processors that stand in for diffusers' own (decoder_attention.py, fa4_attention.py)."""
    if getattr(attn, "fused_projections", False):
        if context is None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            return query, key, value
        key, value = attn.to_kv(context).chunk(2, dim=-1)
        return attn.to_q(hidden_states), key, value
    keys_from = hidden_states if context is None else context
    return attn.to_q(hidden_states), attn.to_k(keys_from), attn.to_v(keys_from)


def plain_sdpa_block(attn: Any) -> bool:
    """Whether a diffusers Attention block runs one of diffusers' two plain SDPA processors (AttnProcessor2_0,
    FusedAttnProcessor2_0) with no spatial norm, q/k norms or norm on its context: the case the processors that
    stand in for them cover. Anything else (xformers, a user's own processor) is left alone."""
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    plain = type(attn.processor) in (AttnProcessor2_0, FusedAttnProcessor2_0)
    extras = (attn.spatial_norm, attn.norm_q, attn.norm_k, getattr(attn, "norm_cross", None))
    return plain and all(extra is None for extra in extras)
