"""Cross-attention keys and values computed once per prompt instead of at every UNet call: a candidate exact
lever for the 40-step ensemble's 1.2 s, prototyped here to be measured before the engine takes it.

Why: in SDXL's UNets the cross-attention's keys and values are a projection of the prompt embeddings alone, which
do not change between denoising steps, yet every call projects them again: one fused `to_kv` matmul per
transformer block (70 in the base, [rows x 77 x 2048] x [2048 x 2C]), 32 times an image in the base stage. Each is
small (154 rows of M for a guided image) and on a GPU closer to launch-bound than to the card's peak. With the
keys and values projected once (`fill`, per prompt) into buffers at fixed addresses, the compiled UNet keeps only
the query's projection: the same matmuls on the same inputs, so the same numbers, without 70 kernels a call.

How: each transformer block's `attn2` gets a `PrecomputedCrossKV` processor that reads its keys and values from
its buffer and otherwise does what diffusers' FusedAttnProcessor2_0 does, step for step (the same split, view and
transpose, so attention sees the same strides). The buffers are marked static addresses, so CUDA graphs read them
in place instead of copying them into the graph's inputs at each replay.

Measured with `unet_compiled.py --variants ro,ro+kv` (the per-call saving; `kv_fill_ms` is what filling costs
once per prompt). Predicted in docs/benchmarks.md ("Run 78").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class PrecomputedCrossKV:
    """An `attn2` processor: the query from the hidden states, the keys and values from `kv`, which `fill` wrote
    from this prompt's embeddings (`kv` is the fused `to_kv` projection's output, [rows, tokens, 2 x inner])."""

    def __init__(self) -> None:
        self.kv: torch.Tensor | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.kv is None:
            raise RuntimeError("PrecomputedCrossKV: call fill() with the prompt embeddings before the UNet")
        if attention_mask is not None or hidden_states.ndim != 3:
            # Not SDXL's transformer blocks: better an error than a silently different attention.
            raise ValueError("PrecomputedCrossKV handles unmasked 3-D cross-attention only")
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = torch.split(self.kv, self.kv.shape[-1] // 2, dim=-1)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states / attn.rescale_output_factor


def cross_attentions(unet: Any) -> list[Any]:
    """Every transformer block's cross-attention module (`attn2`), in the UNet's module order."""
    from diffusers.models.attention import BasicTransformerBlock

    return [
        block.attn2
        for block in unet.modules()
        if isinstance(block, BasicTransformerBlock) and block.attn2 is not None
    ]


def install(unet: Any) -> list[PrecomputedCrossKV]:
    """Give each cross-attention a PrecomputedCrossKV processor; refuse one this prototype would compute
    differently (unfused keys and values, or a norm, mask or residual that FusedAttnProcessor2_0 would apply)."""
    processors = []
    for attn in cross_attentions(unet):
        unsupported = [
            name
            for name in (
                "norm_cross",
                "group_norm",
                "spatial_norm",
                "norm_q",
                "norm_k",
                "residual_connection",
            )
            if getattr(attn, name, None)
        ]
        if not getattr(attn, "fused_projections", False) or unsupported:
            raise ValueError(
                f"cross-attention {attn.__class__.__name__}: needs fused keys and values (fuse_qkv_projections) "
                f"and none of {unsupported or 'norms or residuals'}"
            )
        processor = PrecomputedCrossKV()
        attn.set_processor(processor)
        processors.append(processor)
    return processors


@torch.no_grad()
def fill(unet: Any, encoder_hidden_states: torch.Tensor) -> None:
    """Project this prompt's embeddings into every cross-attention's keys and values, once (per prompt, not per
    step). The first fill makes the buffers and marks their addresses static; later fills of the same shape
    write into them, so a CUDA graph recorded after the first one reads the new prompt's values."""
    for attn in cross_attentions(unet):
        processor = attn.processor
        if not isinstance(processor, PrecomputedCrossKV):
            raise ValueError("fill: install() first")
        kv = attn.to_kv(encoder_hidden_states)
        if processor.kv is None or processor.kv.shape != kv.shape:
            processor.kv = kv
            torch._dynamo.mark_static_address(processor.kv)
        else:
            processor.kv.copy_(kv)
