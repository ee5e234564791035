"""The base stage's starting noise, made by the engine the way diffusers makes it, without its CPU concatenation
and blocking upload.

diffusers' `randn_tensor` draws each image's noise from its own CPU generator (the engine's per-image seeds),
concatenates them on the CPU into a fresh tensor and copies that to the GPU with a blocking copy. In a pass this
runs after the pipeline has synchronised with the GPU (its scheduler reads its sigmas back), so all of it is
time the GPU waits. Run 66 (docs/benchmarks.md) profiled that concatenation alone at 44-51 ms a batch of 8 in one
process on the H200 host (0.3-0.8 ms in another; under 1 ms here).

Here each image's noise is drawn by the same call into its row of one reused host buffer (pinned on CUDA, so the
upload is asynchronous), before the pipeline's call: the draws overlap the last prompt's encoders on the GPU,
nothing is concatenated, and the pipeline is handed latents already on the device (`latents=`), which it only
scales by the scheduler's initial sigma, as it does its own. The noise is the same, bit for bit (tested).
"""

from __future__ import annotations

import torch


class StartingNoise:
    """Used from the engine's GPU thread only, one pass at a time (the buffer is reused across passes)."""

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None
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
        device = torch.device(device)
        on_cuda = device.type == "cuda"
        rows = self._rows(len(generators), shape, dtype, pinned=on_cuda)
        for row, generator in zip(rows.split(1), generators, strict=True):
            # diffusers' randn_tensor with a list of generators: one (1, C, H, W) draw per generator, on its device.
            torch.randn(row.shape, generator=generator, dtype=dtype, out=row)
        if not on_cuda:
            return rows.clone()  # the buffer is the next pass's: the caller gets its own
        uploaded = rows.to(device, non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()
        return uploaded

    def _rows(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        if self._uploaded is not None:
            self._uploaded.synchronize()  # done long ago in practice: a pass ends synchronised
            self._uploaded = None
        host = self._host
        if (
            host is None
            or host.dtype != dtype
            or tuple(host.shape[1:]) != shape
            or host.shape[0] < count
            or host.is_pinned() != pinned
        ):
            host = torch.empty((count, *shape), dtype=dtype, pin_memory=pinned)
            self._host = host
        return host[:count]
