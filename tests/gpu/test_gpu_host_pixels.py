"""On a CUDA GPU: pixels fetched through the kept pinned buffer are the device's bytes, pass after pass, and an
earlier pass's images (copied out by Image.fromarray) survive the next fetch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.engine.host_pixels import HostPixels

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fetched_pixels_are_the_devices_and_earlier_images_survive() -> None:
    host = HostPixels()
    first = torch.randint(0, 256, (3, 64, 48, 3), dtype=torch.uint8, device="cuda")
    images = [Image.fromarray(array) for array in host.fetch(first)]
    second = torch.randint(0, 256, (2, 64, 48, 3), dtype=torch.uint8, device="cuda")
    assert np.array_equal(host.fetch(second), second.cpu().numpy())
    assert all(
        np.array_equal(np.asarray(image), row) for image, row in zip(images, first.cpu().numpy(), strict=True)
    )
