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

The text encoders too: `encode_prompt` moves each encoder's token ids to `get_module_execution_device(encoder)`,
which looks for group-offload hooks and then walks the encoder's modules for accelerate's. Run 67 profiled it with
Python's functions: ~6 ms of each prompt's ~7.5 ms hole (the tracer's), 4,264 module visits a prompt. The pipeline
module's name for that function is replaced by one that answers at once for an encoder the engine pinned and asks
diffusers' own function about any other module, so nothing else changes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from diffusers.utils.torch_utils import get_module_execution_device

# One pinned subclass per pipeline class, so pinning many pipelines does not make many classes.
_PINNED: dict[type, type] = {}
# Where a pinned pipeline or text encoder keeps its device.
_DEVICE_ATTRIBUTE = "_imagesmith_execution_device"


def _pinned_execution_device(pipe: Any) -> torch.device:
    return getattr(pipe, _DEVICE_ATTRIBUTE)


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
    device = torch.device(device)
    # object.__setattr__: DiffusionPipeline's own __setattr__ would treat the name as a config entry.
    object.__setattr__(pipe, _DEVICE_ATTRIBUTE, device)
    pipe.__class__ = pinned
    _answer_pinned_modules_in(sys.modules[original.__module__])
    for encoder in _text_encoders(pipe):
        encoder.__dict__[_DEVICE_ATTRIBUTE] = device  # a plain attribute, not a submodule or buffer


def unpin_execution_device(pipe: Any) -> None:
    """Back to diffusers' search (a benchmark's peer), for the pipeline and its text encoders (which the
    refiner shares with the base)."""
    pipe.__class__ = unpinned_class(pipe)
    for encoder in _text_encoders(pipe):
        encoder.__dict__.pop(_DEVICE_ATTRIBUTE, None)


def _text_encoders(pipe: Any) -> list[torch.nn.Module]:
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    return [encoder for encoder in encoders if isinstance(encoder, torch.nn.Module)]


def pinned_module_device(module: torch.nn.Module) -> torch.device | None:
    return module.__dict__.get(_DEVICE_ATTRIBUTE)


def module_execution_device(
    module: torch.nn.Module,
    search: Callable[[torch.nn.Module], torch.device] = get_module_execution_device,
) -> torch.device:
    """Where `module` runs: its pinned device at once, else `search`'s answer (diffusers' function by default,
    which walks every one of the module's submodules for an offload hook)."""
    pinned = pinned_module_device(module)
    return pinned if pinned is not None else search(module)


def _answer_pinned_modules_in(pipeline_module: Any) -> None:
    """Replace the pipeline module's `get_module_execution_device` (once) with one that answers a pinned
    module's device at once and asks diffusers' function about every other module."""
    original: Callable[[torch.nn.Module], torch.device] | None = getattr(
        pipeline_module, "get_module_execution_device", None
    )
    if original is None or getattr(original, "_imagesmith_answers_pinned", False):
        return

    def get_module_execution_device(module: torch.nn.Module) -> torch.device:
        return module_execution_device(module, original)

    get_module_execution_device._imagesmith_answers_pinned = True  # type: ignore[attr-defined]
    pipeline_module.get_module_execution_device = get_module_execution_device


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
