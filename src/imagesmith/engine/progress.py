"""Progress events and cancellation, shared by the engine and whoever drives it (CLI bar, API events, logs)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The stage after denoising: the VAE turns the latents into pixels. It has no steps; see ProgressEvent.stage.
DECODE_STAGE = "decode"


@dataclass
class ProgressEvent:
    # "base", "refine" or "base_finish" (refiner fallback): the denoising stages; then "decode" (DECODE_STAGE),
    # heard as step 0 of 1 when it starts and 1 of 1 when the pixels are ready.
    stage: str
    step: int  # steps done in this stage, 1-based (0: the decode has started)
    total: int  # steps this stage runs
    elapsed_s: float  # since the generation started
    # The stage's current latents (batch, 4, h/8, w/8) on the device, for cheap previews. Read it during the
    # callback only (or queue work that reads it on the device's stream then, as preview.PreviewCopy does):
    # the engine keeps writing to it.
    latents: Any = None


ProgressCallback = Callable[[ProgressEvent], None]


class GenerationCanceled(Exception):
    """The caller canceled; raised from inside the step loop, so a run stops within one step."""


class CancelToken:
    """Set from any thread; the engine checks it after every denoising step and between stages."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def canceled(self) -> bool:
        return self._event.is_set()
