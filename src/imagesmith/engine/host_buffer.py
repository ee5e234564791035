"""One block of host memory kept across passes and viewed as whatever a pass needs.

Fresh host memory is paid for in page faults the first time it is written (on this 2-core machine 25 MB took 50
ms fresh against 1.4 ms reused), and pinned memory besides costs a page-locking call. A pass's starting noise
(engine/starting_noise.py) and its decoded pixels (engine/host_pixels.py) each keep one of these instead.
"""

from __future__ import annotations

import math

import torch


class HostBuffer:
    """Not thread-safe: each owner uses it one pass at a time, and a view is valid until the next one."""

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def view(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        """A tensor of `shape` over the kept buffer, grown (never shrunk) when it is too small."""
        needed = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        flat = self._flat
        if flat is None or flat.numel() < needed or flat.is_pinned() != pinned:
            flat = torch.empty(needed, dtype=torch.uint8, pin_memory=pinned)
            self._flat = flat
        return flat[:needed].view(dtype).view(shape)
