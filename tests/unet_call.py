"""The arguments of one UNet call, as the tests build them."""

from __future__ import annotations

from typing import Any

import torch


def unet_inputs(
    config: Any, rows: int, side: int = 16, ids: int = 6
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One UNet pass's arguments as diffusers' SDXL pipelines pass them: `rows` rows of side x side latents, and
    `ids` size/crop ids (the refiner's pipeline passes 5, an aesthetic score in place of the target size)."""
    generator = torch.Generator().manual_seed(rows)
    return (torch.randn(rows, config.in_channels, side, side, generator=generator), torch.tensor(500.0)), {
        "encoder_hidden_states": torch.randn(rows, 77, config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(
                rows,
                config.projection_class_embeddings_input_dim - ids * config.addition_time_embed_dim,
                generator=generator,
            ),
            "time_ids": torch.randn(rows, ids, generator=generator),
        },
    }
