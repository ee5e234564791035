from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from imagesmith.preview import PreviewCopy, latents_to_image, preview_data_url


def test_linear_preview_is_small_rgb() -> None:
    latents = torch.randn(2, 4, 128, 96)
    image = latents_to_image(latents, index=1, max_side=64)
    assert image.mode == "RGB" and max(image.size) == 64
    url = preview_data_url(latents[:1], max_side=32)
    data = base64.b64decode(url.split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size == (24, 32)


def test_a_preview_copy_on_the_cpu_is_ready_at_once_and_is_the_same_picture() -> None:
    latents = torch.randn(2, 4, 40, 24)
    copy = PreviewCopy(latents, index=1)
    assert copy.ready()
    assert copy.data_url(max_side=32) == preview_data_url(latents, index=1, max_side=32)
