"""Latents to pictures, with a guard: a NaN or all-black decode is redone in fp32.

SDXL's stock VAE overflows in fp16 (it produces NaN, which becomes a black image). The plan already decodes in
fp32 where that can happen; this guard catches what slips through (a custom VAE, an unusual prompt).

The pass's images are decoded one at a time (bounded memory) and turned into 8-bit pixels on the device, with
no wait for the host between them: the guard's verdicts come back in one small copy and the pixels in one
more. Decoding, checking and converting each image on the host in turn (as before) left the GPU idle while the
host converted. With the decoder compiled without CUDA graphs (engine/fast.py), a 1024x1024 decode went from
54.8 to 43.8 ms (run 50 in docs/benchmarks.md) and a batch of 8 from 0.414 to 0.323 s (run 49).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from imagesmith.engine.host_pixels import HostPixels

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


def broken_flag(image: torch.Tensor) -> torch.Tensor:
    """On the image's device, without waiting for it: NaN/inf anywhere, or every pixel black (what a NaN
    decode turns into after clamping)."""
    not_finite = ~torch.isfinite(image).all()
    black = (image.float() / 2 + 0.5).clamp(0, 1).amax() < 1.0 / 255
    return not_finite | black


def pixels_u8(image: torch.Tensor) -> torch.Tensor:
    """A [-1, 1] CHW (or 1CHW) tensor to HWC uint8 on its own device. The same fp32 arithmetic as on the host
    (round half to even), so the bytes do not depend on where it runs."""
    array = (image.float().squeeze(0) / 2 + 0.5).clamp(0, 1).nan_to_num(0.0)
    return (array * 255).round().to(torch.uint8).permute(1, 2, 0)


def decode_latents(
    vae: Any,
    latents: torch.Tensor,
    dtype: torch.dtype,
    tiling: bool,
    device: torch.device | str,
    host: HostPixels | None = None,
) -> tuple[list[Image.Image], list[bool]]:
    """Decode one image at a time (bounded memory). Returns the images and, per image, whether it needed fp32.
    `host`: where the pixels land on the host (engine/host_pixels.py); None: a fresh tensor each time."""
    if tiling:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    # `device` is where the VAE computes: with CPU offload its weights rest on the CPU (or the meta device)
    # between uses and the offload hook brings them in, but not the inputs.
    device = torch.device(device)
    pixels: list[torch.Tensor] = []
    flags: list[torch.Tensor] = []
    with torch.no_grad():
        for one in latents.split(1):
            image = _decode_once(vae, one, dtype, device)
            # Consumed before the next decode: a compiled decoder's output may live in memory it reuses.
            if dtype != torch.float32:
                flags.append(broken_flag(image))
            pixels.append(pixels_u8(image))
        retried = torch.stack(flags).tolist() if flags else [False] * len(pixels)
        for index in [index for index, broken in enumerate(retried) if broken]:
            log.warning("VAE decode in %s gave NaN or black pixels; decoding again in fp32", dtype)
            pixels[index] = pixels_u8(_decode_in_fp32(vae, latents[index : index + 1], device))
        stacked = torch.stack(pixels)
        on_host = host.fetch(stacked) if host is not None else stacked.cpu().numpy()
    return [Image.fromarray(array) for array in on_host], retried


def _decode_in_fp32(vae: Any, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
    original = next(vae.parameters()).dtype
    vae.to(torch.float32)
    try:
        return _decode_once(vae, latents, torch.float32, device)
    finally:
        vae.to(original)
