"""Latents to pictures, with a guard: a NaN or all-black decode is redone in fp32.

SDXL's stock VAE overflows in fp16 (it produces NaN, which becomes a black image). The plan already decodes in
fp32 where that can happen; this guard catches what slips through (a custom VAE, an unusual prompt).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


def _scaled(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return latents * std_t / config.scaling_factor + mean_t
    return latents / config.scaling_factor


def _decode_once(vae: Any, latents: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return vae.decode(_scaled(vae, latents).to(device=device, dtype=dtype), return_dict=False)[0]


def looks_broken(image: torch.Tensor) -> bool:
    """NaN/inf anywhere, or every pixel black (what a NaN decode turns into after clamping)."""
    if not torch.isfinite(image).all():
        return True
    return bool((image.float() / 2 + 0.5).clamp(0, 1).amax() < 1.0 / 255)


def decode_latents(
    vae: Any, latents: torch.Tensor, dtype: torch.dtype, tiling: bool, device: torch.device | str
) -> tuple[list[Image.Image], list[bool]]:
    """Decode one image at a time (bounded memory). Returns the images and, per image, whether it needed fp32."""
    if tiling:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    # `device` is where the VAE computes: with CPU offload its weights rest on the CPU (or the meta device)
    # between uses and the offload hook brings them in, but not the inputs.
    device = torch.device(device)
    images, retried = [], []
    with torch.no_grad():
        for one in latents.split(1):
            image = _decode_once(vae, one, dtype, device)
            needed_fp32 = False
            if looks_broken(image) and dtype != torch.float32:
                log.warning("VAE decode in %s gave NaN or black pixels; decoding again in fp32", dtype)
                original = next(vae.parameters()).dtype
                vae.to(torch.float32)
                try:
                    image = _decode_once(vae, one, torch.float32, device)
                finally:
                    vae.to(original)
                needed_fp32 = True
            images.append(to_pil(image))
            retried.append(needed_fp32)
    return images, retried


def to_pil(image: torch.Tensor) -> Image.Image:
    """A [-1, 1] CHW (or 1CHW) tensor to an 8-bit RGB picture."""
    array = (image.float().squeeze(0) / 2 + 0.5).clamp(0, 1).nan_to_num(0.0)
    pixels = (array.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(pixels)
