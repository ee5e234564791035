"""Prompt embeddings, cached: a repeated prompt or negative prompt skips the text encoders.

Content pipelines repeat themselves (the same negative prompt on every request, several seeds of one prompt),
and both SDXL text encoders run for the base and again (OpenCLIP-bigG) for the refiner on every call. The cache
keeps each (pipeline, prompt, negative prompt, guidance on/off) result on the device, least recently used
first out. The embeddings are exactly what the pipeline would compute itself: it is handed the same tensors
through its prompt_embeds arguments.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

Embeddings = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


class PromptEmbeddingCache:
    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[object, ...], Embeddings] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _one(self, pipe: Any, role: str, prompt: str, negative: str | None, guided: bool) -> Embeddings:
        key = (role, prompt, negative, guided)
        cached = self._entries.get(key)
        if cached is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return cached
        self.misses += 1
        # negative None (not ""): SDXL's base then uses zeros for the unconditional branch, as it was trained.
        embeddings: Embeddings = pipe.encode_prompt(
            prompt=prompt,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negative,
        )
        if self.max_entries > 0:
            self._entries[key] = embeddings
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return embeddings

    def pipeline_args(
        self, pipe: Any, role: str, prompts: list[str], negatives: list[str] | None, guidance_scale: float
    ) -> dict[str, torch.Tensor | None]:
        """The prompt_embeds arguments of a pipeline call for a batch of rows (one prompt per image)."""
        guided = guidance_scale > 1.0  # diffusers' do_classifier_free_guidance for SDXL
        rows = [
            self._one(pipe, role, prompt, negatives[index] if negatives else None, guided)
            for index, prompt in enumerate(prompts)
        ]
        embeds, negative_embeds, pooled, negative_pooled = zip(*rows, strict=True)
        return {
            "prompt_embeds": torch.cat(embeds),
            "pooled_prompt_embeds": torch.cat(pooled),
            "negative_prompt_embeds": torch.cat(negative_embeds) if guided else None,
            "negative_pooled_prompt_embeds": torch.cat(negative_pooled) if guided else None,
        }
