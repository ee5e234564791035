"""Cheap previews from SDXL latents: a fixed linear map from the 4 latent channels to RGB, no VAE.

The coefficients are the widely used SDXL latent-to-RGB approximation (as in ComfyUI's live previews): each
pixel's colour is a weighted sum of its 4 latent values plus a bias. It costs one small matrix product, so the
worker can afford one every few steps; the picture is blurry and 1/8 scale, which is all a progress view needs.
"""

from __future__ import annotations

import base64
import functools
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


@functools.cache
def _colour_map(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors and the bias on `device`, made once per device. Why not per preview: a tensor made from
    Python numbers on a GPU is copied there from pageable host memory, and CUDA runs such a copy only after
    every step already queued on the stream, the very wait PreviewCopy exists to avoid. From pinned memory the
    copy is queued like any other work."""
    factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32)
    if device.type == "cuda":
        factors, bias = factors.pin_memory(), bias.pin_memory()
    return factors.to(device, non_blocking=True), bias.to(device, non_blocking=True)


def _rgb_pixels(latents: Any, index: int) -> torch.Tensor:
    """Image `index` of a (batch, 4, h, w) latent tensor as (h, w, 3) uint8 pixels, on the latents' device."""
    sample = latents[index].detach().to(dtype=torch.float32)  # (4, h, w)
    factors, bias = _colour_map(sample.device)
    rgb = torch.einsum("chw,cr->hwr", sample, factors) + bias  # roughly in [-1, 1]
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _image(pixels: torch.Tensor, max_side: int) -> Image.Image:
    image = Image.fromarray(pixels.numpy(), mode="RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    return image


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def latents_to_image(latents: Any, index: int = 0, max_side: int = 128) -> Image.Image:
    """Image `index` of a (batch, 4, h, w) latent tensor as a small RGB picture (waits for the device)."""
    return _image(_rgb_pixels(latents, index).cpu(), max_side)


def preview_data_url(latents: Any, index: int = 0, max_side: int = 128) -> str:
    """The preview as a data: URL (JPEG), small enough to ride inside one server-sent event."""
    return _data_url(latents_to_image(latents, index, max_side))


class PreviewCopy:
    """A preview on its way to the host, without waiting for the GPU.

    Why: `latents_to_image` copies to the host, which waits until the GPU has run every step queued so far. With
    CUDA graphs the host queues steps ahead of the GPU; a wait every few steps drains that queue, and the GPU
    then idles while the host queues the next step. The service's one-image request ran its 32 base steps in
    1.18 s against 1.05 s in the engine alone, which makes no previews (runs 29 and 33, docs/benchmarks.md).
    Here the colour map and the copy are queued on the GPU's stream behind the step (so they read this
    step's latents, before a later graph replay overwrites them) into pinned host memory, with an event; the
    caller picks the picture up at a later step, once `ready()` says the copy is done. On the CPU it is ready
    at once."""

    def __init__(self, latents: Any, index: int = 0) -> None:
        pixels = _rgb_pixels(latents, index)
        self._done: torch.cuda.Event | None = None
        if pixels.is_cuda:
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            self._done = torch.cuda.Event()
            # On the latents' own device's stream: the engine may run on a GPU other than the current one.
            self._done.record(torch.cuda.current_stream(pixels.device))
            self._pixels = host
        else:
            self._pixels = pixels.cpu()  # the CPU (a no-op) or another backend (it waits, as before)

    def ready(self) -> bool:
        """Whether the pixels are on the host (never waits)."""
        return self._done is None or self._done.query()

    def data_url(self, max_side: int = 128) -> str:
        """The preview as preview_data_url gives it; call once ready() (otherwise it waits for the copy)."""
        if self._done is not None:
            self._done.synchronize()
        return _data_url(_image(self._pixels, max_side))
