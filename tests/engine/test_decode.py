"""The decode: pixels made on the device match the host arithmetic they replaced, and only broken images are
redone in fp32."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from imagesmith.engine.decode import decode_latents, pixels_u8


def host_pixels(image: torch.Tensor) -> np.ndarray:
    """The conversion as it was done on the host before (numpy after the copy)."""
    array = (image.float().squeeze(0) / 2 + 0.5).clamp(0, 1).nan_to_num(0.0)
    return (array.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_device_pixels_are_the_host_conversions_bytes() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 40, 56, generator=generator) * 1.5  # past [-1, 1] on both sides
    image[0, 1, 3, 4] = float("nan")
    # Values whose (x / 2 + 0.5) x 255 lands on or next to k + 0.5, where the rounding rule shows.
    image[0, 0, 0, :4] = torch.tensor([(2 * k + 1) / 255 - 1 for k in (0, 1, 2, 127)])
    for dtype in (torch.float32, torch.bfloat16):
        converted = pixels_u8(image.to(dtype))
        assert converted.dtype == torch.uint8 and converted.shape == (40, 56, 3)
        assert np.array_equal(converted.numpy(), host_pixels(image.to(dtype)))
    # And through the decode itself (fp32: no retry of the NaN pixel's image).
    images, _ = decode_latents(_Vae(picture=image), torch.zeros(1, 4, 1, 1), torch.float32, False, "cpu")
    assert np.array_equal(np.asarray(images[0]), host_pixels(image))


class _Vae:
    """A VAE stand-in: decodes latents to `picture` if given, else to a picture whose value is the latents'
    mean, NaN when the first latent overflows 16 bits; in the latents' dtype."""

    config = dataclasses.make_dataclass("Config", [("scaling_factor", float)])(1.0)

    def __init__(self, picture: torch.Tensor | None = None) -> None:
        self.picture = picture
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
        self.decoded_dtypes: list[torch.dtype] = []

    def parameters(self) -> Any:
        return iter([self.weight])

    def to(self, dtype: torch.dtype) -> _Vae:
        self.weight.data = self.weight.data.to(dtype)
        return self

    def enable_tiling(self) -> None: ...

    def disable_tiling(self) -> None: ...

    def decode(self, latents: torch.Tensor, return_dict: bool) -> tuple[torch.Tensor]:
        self.decoded_dtypes.append(latents.dtype)
        if self.picture is not None:
            return (self.picture.to(latents.dtype),)
        value = latents.float().mean()
        if latents.dtype != torch.float32 and latents[0, 0, 0, 0] > 100:
            value = torch.tensor(float("nan"))  # overflows in 16 bits only
        return (torch.full((1, 3, 8, 8), float(value), dtype=latents.dtype),)


def test_only_the_broken_image_is_decoded_again_in_fp32() -> None:
    vae = _Vae()
    latents = torch.zeros(3, 4, 1, 1)
    latents[:, 1] = 0.2
    latents[1, 0] = 400.0  # image 1 overflows in bf16
    images, retried = decode_latents(vae, latents, torch.bfloat16, False, "cpu")
    assert retried == [False, True, False]
    assert vae.decoded_dtypes == [torch.bfloat16] * 3 + [torch.float32]
    assert vae.weight.dtype == torch.bfloat16  # put back after the fp32 decode
    values = [np.asarray(image)[0, 0, 0] for image in images]
    # mean 0.05 -> (0.05 / 2 + 0.5) x 255 = 133.9; image 1 in fp32: mean 100.05 -> clamped to 255
    assert values == [134, 255, 134]
