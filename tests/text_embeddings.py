"""What diffusers' own encode_prompt gives for one text: the reference the prompt cache's embeddings must equal."""

from __future__ import annotations

from typing import Any

import torch


def encode_prompt_alone(pipe: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (embeddings, pooled embedding) of `text` alone, without guidance, as the pipeline computes them."""
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt=text,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
    return hidden, pooled
