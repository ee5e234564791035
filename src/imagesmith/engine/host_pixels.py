"""The decoded pixels' way to the host, into memory that is already there.

Why: between two passes of a batch of 8 at 1024x1024 the GPU waits 25-44 ms (runs 66-68, docs/benchmarks.md)
while the host takes the images: a fresh 25 MB tensor receives the copy from the GPU, then 8 fresh Pillow
images (4 MB each) receive the pixels. Fresh memory is paid for in page faults the first time it is written. On
this 2-core machine, copying 25 MB into fresh memory took 50 ms against 1.4 ms into memory written before, and
Pillow's 8 images took 19 ms against 3.6 ms once Pillow keeps its freed blocks (by default it gives every one
back to the system). So:

- the copy from the GPU lands in one pinned buffer kept across passes (grown when a pass needs more): the DMA
  writes straight into it, with no staging copy and no page faults after the first pass;
- Pillow keeps up to PILLOW_BLOCKS freed blocks for its next images (`Image.core.set_blocks_max`; a higher value
  set by the user, e.g. PILLOW_BLOCKS_MAX in the environment, is kept). A block holds one image up to 16 MB,
  memory the last batch used anyway.

The pixels are the same bytes either way (tested). On the H200 (run 69, MLPerf batch 8, 8 alternating rounds
against a fresh `.cpu()` tensor and Pillow's default) it gave -4 ms a batch, within the spread: the copy and the
images were not where the between-pass wait went.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from imagesmith.engine.host_buffer import HostBuffer

# Enough for a batch of the largest batch_max the benchmarks use (16): each image is one block.
PILLOW_BLOCKS = 16


def keep_pillow_blocks(count: int = PILLOW_BLOCKS) -> None:
    """Let Pillow reuse up to `count` freed blocks for new images; never lowers the current setting."""
    if Image.core.get_blocks_max() < count:
        Image.core.set_blocks_max(count)


class HostPixels(HostBuffer):
    """Used from the engine's GPU thread only, one pass at a time: an array it returns is valid until the next
    fetch, so the caller copies out of it (Image.fromarray does) before the next pass."""

    def fetch(self, pixels: torch.Tensor) -> np.ndarray:
        """`pixels` (uint8, any shape) as a host array. From a CUDA device through the reused pinned buffer;
        from anywhere else as `.cpu()` gives it."""
        if pixels.device.type != "cuda":
            return pixels.cpu().numpy()
        host = self.view(pixels.shape, pixels.dtype, pinned=True)
        host.copy_(pixels)  # waits for the GPU, as .cpu() did: the pass's images are done
        return host.numpy()
