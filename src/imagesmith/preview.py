"""Cheap previews from SDXL latents: a fixed linear map from the 4 latent channels to RGB, no VAE.

The coefficients are the widely used SDXL latent-to-RGB approximation (as in ComfyUI's live previews): each
pixel's colour is a weighted sum of its 4 latent values plus a bias. It costs one small matrix product, so the
worker can afford one every few steps; the picture is blurry and 1/8 scale, which is all a progress view needs.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from PIL import Image

SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latents_to_image(latents: Any, index: int = 0, max_side: int = 128) -> Image.Image:
    """Image `index` of a (batch, 4, h, w) latent tensor as a small RGB picture."""
    sample = latents[index].detach().to(dtype=torch.float32)  # (4, h, w), on whatever device it lives
    factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32, device=sample.device)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32, device=sample.device)
    rgb = torch.einsum("chw,cr->hwr", sample, factors) + bias  # roughly in [-1, 1]
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    image = Image.fromarray(pixels, mode="RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    return image


def preview_data_url(latents: Any, index: int = 0, max_side: int = 128) -> str:
    """The preview as a data: URL (JPEG), small enough to ride inside one server-sent event."""
    buffer = io.BytesIO()
    latents_to_image(latents, index, max_side).save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
