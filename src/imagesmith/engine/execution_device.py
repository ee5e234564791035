"""The pipelines' execution device, answered without a search when nothing is offloaded.

Why: diffusers' `DiffusionPipeline._execution_device` looks for offload hooks on every use: it walks every module
of every component (twice for some), ~4,000 modules for SDXL's base pipeline, 10 ms of host time on a 2-core
machine. A pass asked for it once per prompt encoded (engine/prompt_cache.py calls `encode_prompt` one prompt at a
time), once inside the pipeline's `__call__` and once for the decode: ten times for a batch of 8, with the GPU
idle meanwhile, since nothing is queued on it before a pass's first UNet call. Run 64 profiled it on an H200: a
hole of ~12 ms before each prompt's encoders, ~225 ms of GPU idle a batch of 8 in all (docs/benchmarks.md).

Without offload every module stays on the plan's device for the engine's life, so the answer cannot change, and
the engine pins it: the pipeline's class is swapped for a subclass (same name, same behaviour otherwise) whose
`_execution_device` returns the device. With model or sequential offload the hooks decide, and nothing is pinned.
"""

from __future__ import annotations

from typing import Any

import torch

# One pinned subclass per pipeline class, so pinning many pipelines does not make many classes.
_PINNED: dict[type, type] = {}


def _pinned_execution_device(pipe: Any) -> torch.device:
    return pipe._imagesmith_execution_device


def pin_execution_device(pipe: Any, device: torch.device | str) -> None:
    """Make `pipe._execution_device` answer `device` at once. Only for a pipeline that is not offloaded."""
    original = unpinned_class(pipe)
    pinned = _PINNED.get(original)
    if pinned is None:
        pinned = type(
            original.__name__,
            (original,),
            {
                "__module__": original.__module__,
                "__doc__": original.__doc__,
                "_execution_device": property(_pinned_execution_device),
                "_imagesmith_unpinned": original,
            },
        )
        _PINNED[original] = pinned
    # object.__setattr__: DiffusionPipeline's own __setattr__ would treat the name as a config entry.
    object.__setattr__(pipe, "_imagesmith_execution_device", torch.device(device))
    pipe.__class__ = pinned


def unpin_execution_device(pipe: Any) -> None:
    """Back to diffusers' search (a benchmark's peer)."""
    pipe.__class__ = unpinned_class(pipe)


def unpinned_class(pipe: Any) -> type:
    return getattr(type(pipe), "_imagesmith_unpinned", type(pipe))


def is_pinned(pipe: Any) -> bool:
    return unpinned_class(pipe) is not type(pipe)


def pin_pipelines(pipes: list[Any], plan: Any) -> int:
    """Pin every pipeline the plan keeps resident on its device (offload "none"); returns how many."""
    if plan.offload != "none":
        return 0
    for pipe in pipes:
        pin_execution_device(pipe, plan.device)
    return len(pipes)
