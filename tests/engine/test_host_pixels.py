"""The decoded pixels' way to the host without fresh memory each pass: the kept buffer is reused and grown, its
views hold the right bytes, Pillow keeps its freed blocks once an engine exists (without lowering a user's
setting), and the engine's images are the same bytes as without the buffer."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from imagesmith.engine import Engine
from imagesmith.engine.host_pixels import PILLOW_BLOCKS, HostPixels, keep_pillow_blocks
from imagesmith.schemas import GenerationRequest


def test_the_buffer_is_reused_and_grown_only_when_too_small() -> None:
    host = HostPixels()
    first = host.view((2, 8, 8, 3), torch.uint8, pinned=False)
    again = host.view((1, 8, 8, 3), torch.uint8, pinned=False)
    assert again.data_ptr() == first.data_ptr()  # smaller: the same memory
    bigger = host.view((4, 8, 8, 3), torch.uint8, pinned=False)
    assert bigger.shape == (4, 8, 8, 3) and bigger.numel() == 4 * 8 * 8 * 3
    after = host.view((3, 8, 8, 3), torch.uint8, pinned=False)
    assert after.data_ptr() == bigger.data_ptr()  # grown once, then kept


def test_a_view_holds_what_is_copied_into_it() -> None:
    host = HostPixels()
    pixels = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    view = host.view(pixels.shape, pixels.dtype, pinned=False)
    view.copy_(pixels)
    assert np.array_equal(view.numpy(), pixels.numpy())


def test_off_cuda_the_pixels_come_back_as_they_are() -> None:
    pixels = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    assert np.array_equal(HostPixels().fetch(pixels), pixels.numpy())


@pytest.fixture
def pillow_blocks() -> Iterator[None]:
    before = Image.core.get_blocks_max()
    yield
    Image.core.set_blocks_max(before)


@pytest.mark.usefixtures("pillow_blocks")
def test_pillow_keeps_freed_blocks_for_the_next_images() -> None:
    Image.core.set_blocks_max(0)  # Pillow's default: every block back to the system
    keep_pillow_blocks()
    assert Image.core.get_blocks_max() == PILLOW_BLOCKS
    array = np.zeros((256, 256, 3), dtype=np.uint8)
    images = [Image.fromarray(array) for _ in range(4)]
    del images
    reused = Image.core.get_stats()["reused_blocks"]
    again = [Image.fromarray(array) for _ in range(4)]  # held, so each takes a block of its own
    assert Image.core.get_stats()["reused_blocks"] >= reused + len(again)


@pytest.mark.usefixtures("pillow_blocks")
def test_a_higher_setting_is_kept() -> None:
    Image.core.set_blocks_max(PILLOW_BLOCKS * 4)
    keep_pillow_blocks()
    assert Image.core.get_blocks_max() == PILLOW_BLOCKS * 4


@pytest.mark.usefixtures("pillow_blocks")
def test_an_engine_keeps_pillows_blocks(tiny_engine: Engine) -> None:
    Image.core.set_blocks_max(0)
    Engine(tiny_engine.models, tiny_engine.plan)._gpu.close()
    assert Image.core.get_blocks_max() >= PILLOW_BLOCKS


def test_the_engines_images_are_unchanged_without_the_buffer(tiny_engine: Engine) -> None:
    request = GenerationRequest(
        prompt="a quay", width=64, height=64, num_inference_steps=3, seed=5, num_images=2
    )
    kept = [np.asarray(image) for image in tiny_engine.generate(request).images]
    host, tiny_engine.host_pixels = tiny_engine.host_pixels, None  # type: ignore[assignment]
    try:
        fresh = [np.asarray(image) for image in tiny_engine.generate(request).images]
    finally:
        tiny_engine.host_pixels = host
    assert all(np.array_equal(a, b) for a, b in zip(kept, fresh, strict=True))
