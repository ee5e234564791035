"""On a CUDA GPU: a progress preview is queued behind the step and never makes the host wait for the GPU."""

from __future__ import annotations

import pytest
import torch

from imagesmith import preview
from imagesmith.preview import PreviewCopy, preview_data_url

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_preview_copy_returns_before_the_gpu_gets_to_it_and_shows_that_steps_latents() -> None:
    latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.bfloat16)
    expected = preview_data_url(latents.clone())
    preview._colour_map.cache_clear()  # its first use on a device must not wait for the GPU either
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the preview (a long step)
    copy = PreviewCopy(latents)
    assert not copy.ready()  # the host did not wait for the GPU
    latents.zero_()  # the next step overwrites the latents; the preview, queued before, still sees the old
    torch.cuda.synchronize()
    assert copy.ready()
    assert copy.data_url() == expected
