"""The base UNet's cross-attentions computed for the guided rows only, when the unguided rows' text is zeros.

A prototype for `fast_path.py +zu` (session 48), to measure before building it into the engine.

Why it is exact: SDXL's base was trained with zeros for an empty negative prompt (force_zeros_for_empty_prompt),
and the engine passes zeros then (engine/prompt_cache.py). Its cross-attentions project keys and values without
a bias, so for those rows the keys and values are zeros, the softmax is uniform over zero values, the attention
is exactly 0, and the block returns exactly its output projection's bias. Computing only the other half of the
batch (diffusers puts the negative rows first) saves each cross-attention's query and output projections and
its attention for half the rows: ~0.47 TFLOP of a base call's ~12 at batch 2, ~4 %.

What it assumes, and the engine would have to guarantee: every pass through the wrapped UNet is guided and has
no negative prompt (batch_key already keeps passes with and without one apart). The refiner's empty negative
prompt is encoded text, not zeros (its force_zeros_for_empty_prompt is false), so only the base gains.
"""

from __future__ import annotations

from typing import Any

import torch


class GuidedRowsCrossAttention:
    """Stands in for a cross-attention block's processor: runs it on the second half of the batch (the guided
    rows) and gives the first half (zero text) the output projection's bias, as the full computation would."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None or hidden_states.shape[0] % 2:
            raise ValueError(
                "GuidedRowsCrossAttention needs a guided batch of cross-attention without a mask"
            )
        half = hidden_states.shape[0] // 2
        guided = self.inner(
            attn, hidden_states[half:], encoder_hidden_states[half:], None, temb, *args, **kwargs
        )
        unguided = attn.to_out[0].bias.to(guided.dtype).expand(half, *guided.shape[1:])
        return torch.cat([unguided, guided])


def cross_attentions(unet: Any) -> list[Any]:
    """The UNet's cross-attention blocks (attn2 of each transformer block), which take the text."""
    return [module.attn2 for module in unet.modules() if getattr(module, "attn2", None) is not None]


def compute_guided_rows_only(unet: Any) -> int:
    """Wrap every cross-attention's processor; returns how many. Before compiling (the traced code is the
    wrapped one)."""
    blocks = cross_attentions(unet)
    for block in blocks:
        if block.use_bias or block.to_out[0].bias is None:  # use_bias: the keys' and values' projections'
            raise ValueError("the shortcut needs keys and values without a bias and an output with one")
        block.set_processor(GuidedRowsCrossAttention(block.processor))
    return len(blocks)
