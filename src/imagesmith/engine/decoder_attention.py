"""The VAE decoder's one attention as two matmuls and a softmax, routed by size inside the traced code
(IMAGESMITH_DECODER_MATH_ATTENTION, on by default with compile).

Why: the SDXL VAE's mid-block attends over every latent position with one head 512 wide (16,384 positions at
1024x1024). No flash kernel takes head dimension 512, so torch runs it in the memory-efficient kernel, 4.5 ms of
a ~39 ms compiled decode on an H100. Compiled as matmuls instead, inductor gives cuBLAS matmuls (bf16 operands,
fp32 accumulation) and a fused softmax: the decode took 36.0 ms against 38.8 (run 80 in docs/benchmarks.md, H100,
same process), the image within bf16 rounding of the kernel's (relative L2 1.2e-2, 51.5 dB, the size of any
reordering of the sums). The score matrix is 0.5 GiB in bf16 at 1024x1024, yet the compiled decode's peak did
not grow (1.45 GiB either way).

Where it applies, decided in the processor's own code, which dynamo traces and guards on:
- only while compiling (`torch.compiler.is_compiling()`): eager, the matrix would be written and read back by
  separate kernels; a decoder fallen back to eager after a failed compile takes the fused kernel by itself;
- only in bf16, where it was measured: fp16 scores can overflow where the fused kernels keep fp32, and the fp32
  retry of a NaN decode has nothing to gain;
- only up to MAX_POSITIONS (128x128 latents): the matrix grows with the positions squared, 8 GiB at 2048x2048,
  where the kernel needs none.
The size test is a branch on a shape, so dynamo guards on it and a graph traced for one side never runs the
other's sizes. With its automatic dynamic shapes, any number of image sizes then compile the decoder a few
times, not once per size: a CPU test of the block sees three graphs for eight sizes (the first size static, one
dynamic graph below the bound, one above); a whole decoder may add one as its height and width turn dynamic one
at a time, and a batch or the fp32 retry one each, as they would without this processor. (Session 30's first form
switched torch's attention flags around the decode; torch reads them only as it traces, so each size needed a
static graph of its own, and a server seeing many sizes recompiled, then past dynamo's 64 graphs served eager:
that form had to be opt-in.) The traced graphs differ with and without it (matmuls or one attention call), so
inductor's caches tell them apart by themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from imagesmith.engine.attention import plain_sdpa_block, qkv_projections

log = logging.getLogger(__name__)

# Latent positions up to which the decode's attention runs as matmuls: 128x128, a 1024x1024 image, where it was
# measured. The math holds the whole score matrix, positions squared: 0.5 GiB in bf16 here, 8 GiB at 2048x2048.
MAX_POSITIONS = 128 * 128


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Self-attention of (batch, heads, positions, head_dim) tensors: as matmuls and a softmax when traced in
    bf16 for up to MAX_POSITIONS positions, else torch's fused kernels. The matmul form is torch's own math path
    with reduced-precision reductions allowed: q and k each scaled by head_dim^-1/4, bf16 operands with fp32
    accumulation, the softmax computed in fp32 and stored in bf16."""
    positions = query.shape[-2]
    if torch.compiler.is_compiling() and query.dtype is torch.bfloat16 and positions <= MAX_POSITIONS:
        root_scale = query.shape[-1] ** -0.25
        scores = (query * root_scale) @ (key * root_scale).transpose(-1, -2)
        return scores.softmax(dim=-1) @ value
    return F.scaled_dot_product_attention(query, key, value)


class DecoderAttentionProcessor:
    """diffusers' AttnProcessor2_0 and FusedAttnProcessor2_0 for the VAE's case only (self-attention over a
    4-D feature map, a group norm, no mask, spatial norm or q/k norms), its attention through `attend`. The
    same sums as theirs otherwise, so eager it gives their output exactly."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # temb feeds only a spatial norm, which _routable rules out; the decoder's mid-block passes None.
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the decoder's attention processor takes self-attention without a mask only")
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = qkv_projections(attn, hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        hidden_states = attend(query, key, value)
        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # the projection, then dropout
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _routable(attn: Any) -> bool:
    """Whether DecoderAttentionProcessor computes what this attention's processor computes: diffusers' two
    plain SDPA processors on plain self-attention. Anything else (xformers, a user's own) is left alone."""
    return plain_sdpa_block(attn) and not attn.is_cross_attention


def route_decoder_attention(decoder: Any) -> int:
    """Give the decoder's attention blocks DecoderAttentionProcessor, before it is compiled (and after any QKV
    fusion, whose processor it replaces); returns how many. Those it cannot stand for keep theirs, logged."""
    from diffusers.models.attention_processor import Attention

    routed = 0
    for name, module in decoder.named_modules():
        if not isinstance(module, Attention):
            continue
        if isinstance(module.processor, DecoderAttentionProcessor):
            routed += 1  # routed by an earlier call (the levers applied again to the same models)
        elif _routable(module):
            # diffusers types set_processor's argument as its own AttnProcessor.
            processor: Any = DecoderAttentionProcessor()
            module.set_processor(processor)
            routed += 1
        else:
            log.warning("decoder attention %s keeps %s", name, type(module.processor).__name__)
    return routed


def routed_blocks(decoder: Any) -> int:
    """How many of the decoder's attention blocks run through DecoderAttentionProcessor."""
    return sum(
        isinstance(getattr(m, "processor", None), DecoderAttentionProcessor) for m in decoder.modules()
    )


@contextmanager
def processors_kept(decoder: Any) -> Iterator[list[Any]]:
    """The decoder's attention blocks, each given back on exit the processor it had on entry: for the
    benchmarks that route them, or put diffusers' own back, for a while."""
    from diffusers.models.attention_processor import Attention

    kept = {module: module.processor for module in decoder.modules() if isinstance(module, Attention)}
    try:
        yield list(kept)
    finally:
        for block, processor in kept.items():
            block.set_processor(processor)
