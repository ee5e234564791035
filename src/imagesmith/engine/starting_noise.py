"""The base stage's starting noise, made by the engine the way diffusers makes it, without its CPU concatenation
and blocking upload.

diffusers' `randn_tensor` draws each image's noise from its own CPU generator (the engine's per-image seeds),
concatenates them on the CPU into a fresh tensor and copies that to the GPU with a blocking copy. In a pass this
runs after the pipeline has synchronised with the GPU (its scheduler reads its sigmas back), so all of it is
time the GPU waits. Run 66 (docs/benchmarks.md) profiled that concatenation alone at 44-51 ms a batch of 8 in one
process on the H200 host (0.3-0.8 ms in another; under 1 ms here).

Here each image's noise is drawn by the same call into its row of one reused host buffer (pinned on CUDA, so the
upload is asynchronous), nothing is concatenated, and the pipeline is handed latents already on the device
(`latents=`), which it only scales by the scheduler's initial sigma, as it does its own. The noise is the same,
bit for bit (tested).

The draws run on a thread of their own, started before the prompts are encoded: run 67 found them drawn on the
pass's thread right before the pipeline's call still exposed, ~15-19 ms a batch of 8 on the H200 host (a bf16
draw takes torch's scalar path: ~2 ms an image there, 0.35 ms on this machine), because the encoders' GPU work
is short. torch releases the GIL inside an operator, so the draws and the encoders' Python overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from imagesmith.engine.host_buffer import HostBuffer

# One thread for the process: draws are short, and a pass waits for its own before its pipeline call.
_DRAWER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagesmith-noise")


def _draw(rows: torch.Tensor, generators: list[torch.Generator], dtype: torch.dtype) -> None:
    for row, generator in zip(rows.split(1), generators, strict=True):
        # diffusers' randn_tensor with a list of generators: one (1, C, H, W) draw per generator, on its device.
        torch.randn(row.shape, generator=generator, dtype=dtype, out=row)


class StartingNoise:
    """Used from the engine's GPU thread only, one pass at a time (the buffer is reused across passes)."""

    def __init__(self) -> None:
        self._host = HostBuffer()
        # Recorded after each upload: the buffer is rewritten only once the GPU has read it.
        self._uploaded: torch.cuda.Event | None = None

    def latents(
        self,
        generators: list[torch.Generator],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> torch.Tensor:
        """One image's noise per generator, `shape` each (channels, height, width), stacked on `device`."""
        return self.start(generators, shape, dtype, device)()

    def start(
        self,
        generators: list[torch.Generator],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> Callable[[], torch.Tensor]:
        """Start the draws on the noise thread; the function returned waits for them and gives `latents`'s
        answer. The generators must not be used meanwhile (the pipeline uses them only after)."""
        device = torch.device(device)
        on_cuda = device.type == "cuda"
        rows = self._rows(len(generators), shape, dtype, pinned=on_cuda)
        drawn = _DRAWER.submit(_draw, rows, generators, dtype)

        def finish() -> torch.Tensor:
            drawn.result()
            if not on_cuda:
                return rows.clone()  # the buffer is the next pass's: the caller gets its own
            uploaded = rows.to(device, non_blocking=True)
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
            return uploaded

        return finish

    def _rows(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        if self._uploaded is not None:
            self._uploaded.synchronize()  # done long ago in practice: a pass ends synchronised
            self._uploaded = None
        return self._host.view((count, *shape), dtype, pinned)
