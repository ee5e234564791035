"""Scheduler names users pick, mapped to diffusers classes. A fresh scheduler per call: no state carries over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imagesmith.schemas import SchedulerName

# The names AUTOMATIC1111 shows, used in embedded parameters so its tools and ours agree.
A1111_SAMPLER_NAMES: dict[SchedulerName, str] = {
    SchedulerName.EULER: "Euler",
    SchedulerName.EULER_ANCESTRAL: "Euler a",
    SchedulerName.DPMPP_2M: "DPM++ 2M",
    SchedulerName.DPMPP_2M_KARRAS: "DPM++ 2M Karras",
    SchedulerName.DDIM: "DDIM",
    SchedulerName.UNIPC: "UniPC",
}


_LOADED_CONFIG = "_imagesmith_loaded_scheduler_config"
_CONFIG_FILE = "scheduler/scheduler_config.json"


def scheduler_config_on_disk(base: str) -> dict[str, Any] | None:
    """The base model's scheduler config read without loading the model: from its folder, or from the hub's
    cache for a hub id already downloaded. None when it is not there (yet) or cannot be read."""
    folder = Path(base)
    path: Path | None = folder / _CONFIG_FILE if folder.is_dir() else None
    if path is None:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base, _CONFIG_FILE)
        except ValueError:  # neither a folder here nor a valid hub id: the load will say so
            return None
        path = Path(cached) if isinstance(cached, str) else None
    try:
        config = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def loaded_scheduler_config(pipe: Any) -> Any:
    """The scheduler config `pipe` was loaded with, remembered the first time it is asked for.

    Every request replaces pipe.scheduler with a fresh one; building it from the current scheduler's config
    would inherit the previous request's choices (after a Karras request, use_karras_sigmas stayed on for the
    next Euler request: another image and another step split for the same seed)."""
    config = getattr(pipe, _LOADED_CONFIG, None)
    if config is None:
        config = pipe.scheduler.config
        setattr(pipe, _LOADED_CONFIG, config)
    return config


def remember_scheduler_config(pipe: Any, config: Any) -> None:
    """For a pipeline built around another's modules (the base's finisher): use that one's loaded config."""
    setattr(pipe, _LOADED_CONFIG, config)


def make_scheduler(name: SchedulerName, model_config: Any) -> Any:
    """Build `name` from the model's own scheduler config (betas, timestep spacing, prediction type)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if name is SchedulerName.EULER:
        return EulerDiscreteScheduler.from_config(model_config)
    if name is SchedulerName.EULER_ANCESTRAL:
        return EulerAncestralDiscreteScheduler.from_config(model_config)
    if name in (SchedulerName.DPMPP_2M, SchedulerName.DPMPP_2M_KARRAS):
        return DPMSolverMultistepScheduler.from_config(
            model_config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_karras_sigmas=name is SchedulerName.DPMPP_2M_KARRAS,
        )
    if name is SchedulerName.DDIM:
        return DDIMScheduler.from_config(model_config)
    if name is SchedulerName.UNIPC:
        return UniPCMultistepScheduler.from_config(model_config)
    raise ValueError(f"scheduler must be one of {[s.value for s in SchedulerName]}, got {name!r}")
