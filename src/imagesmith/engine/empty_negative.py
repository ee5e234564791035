"""With no negative prompt, the base UNet's cross-attentions run for the guided rows only (opt-in:
IMAGESMITH_EMPTY_NEGATIVE_SHORTCUT).

Why it is exact: SDXL's base was trained with zeros for an empty negative prompt (force_zeros_for_empty_prompt),
and the engine passes zeros then (prompt_cache.zero_negative_rows). Its cross-attentions project keys and values
without a bias, so for those rows the keys and values are zeros, the softmax is uniform over zero values, the
attention is exactly 0, and the block returns exactly its output projection's bias. Computing only the guided
half of the batch (diffusers puts the negative rows first) saves each cross-attention's query and output
projections and its attention for half the rows: ~0.47 TFLOP of a base call's ~12 at 1024x1024.

Measured as a prototype (`fast_path.py +zu`, run 115 in docs/benchmarks.md): an ensemble image 1.291 -> 1.268 s
on an H100 with compile. The engine's version, with its warm-up of both graphs, is not yet measured on a GPU.

A pass with a negative prompt, or unguided, or on a base without zeros, runs the blocks as before: a switch shared
by the wrapped processors says which, set for each pass (pipeline.py). Compiled, the traced code reads the switch,
so Dynamo keeps one graph for each value; the warm-up runs both (fast.warm_up), so nothing compiles on a request.
The refiner's empty negative prompt is encoded text, not zeros (its force_zeros_for_empty_prompt is false): only
the base is wrapped.
"""

from __future__ import annotations

from typing import Any

import torch


class ZeroTextRows:
    """Whether the pass running now gives the base's unguided rows zeros for text. One per wrapped UNet."""

    def __init__(self) -> None:
        self.on = False


class GuidedRowsCrossAttention:
    """Stands in for a cross-attention block's processor. With the switch on, it runs the block on the second
    half of the batch (the guided rows) and gives the first half (zero text) the output projection's bias, which
    is what the full computation gives; with it off, the block as it was."""

    def __init__(self, inner: Any, switch: ZeroTextRows) -> None:
        self.inner, self.switch = inner, switch

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
        if not self.switch.on or encoder_hidden_states is None or attention_mask is not None:
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        half = hidden_states.shape[0] // 2
        guided = self.inner(
            attn, hidden_states[half:], encoder_hidden_states[half:], None, temb, *args, **kwargs
        )
        unguided = attn.to_out[0].bias.to(guided.dtype).expand(half, *guided.shape[1:])
        return torch.cat([unguided, guided])


def cross_attentions(unet: Any) -> list[Any]:
    """The UNet's cross-attention blocks (attn2 of each transformer block): the ones that take the text."""
    return [module.attn2 for module in unet.modules() if getattr(module, "attn2", None) is not None]


def shortcut_problem(unet: Any) -> str | None:
    """Why the shortcut would not be exact for this UNet; None when it is."""
    blocks = cross_attentions(unet)
    if not blocks:
        return "the UNet has no cross-attention blocks"
    for block in blocks:
        output = block.to_out[0]
        if block.use_bias:  # the keys' and values' projections have a bias: zero text gives nonzero keys
            return "its cross-attentions' key and value projections have a bias"
        if getattr(output, "bias", None) is None:
            return "its cross-attentions' output projection has no bias to give the unguided rows"
    return None


def install(unet: Any) -> ZeroTextRows:
    """Wrap every cross-attention's processor (after any other processor change: it wraps what is there, and
    before compiling: the traced code is the wrapped one). Returns the switch the passes set."""
    installed = switch_of(unet)
    if installed is not None:  # levers applied again to the same models: wrapped once is enough
        return installed
    problem = shortcut_problem(unet)
    if problem is not None:
        raise ValueError(f"the empty-negative shortcut is not exact here: {problem}")
    switch = ZeroTextRows()
    for block in cross_attentions(unet):
        block.set_processor(GuidedRowsCrossAttention(block.processor, switch))
    setattr(unet, _SWITCH, switch)  # found in O(1) each pass, not by walking the UNet's ~2,000 modules
    return switch


_SWITCH = "_imagesmith_zero_text_rows"


def switch_of(unet: Any) -> ZeroTextRows | None:
    """The switch of a wrapped UNet; None for one not wrapped (the refiner, or the lever off)."""
    switch = getattr(unet, _SWITCH, None)
    return switch if isinstance(switch, ZeroTextRows) else None


def set_for_pass(unet: Any, zero_text_rows: bool) -> None:
    """Before a pipeline call: whether its unguided rows get zeros for text (a no-op for a UNet not wrapped)."""
    switch = switch_of(unet)
    if switch is not None:
        switch.on = zero_text_rows
