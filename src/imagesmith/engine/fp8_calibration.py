"""Calibrating static fp8 scales (IMAGESMITH_FP8_SCALES=static) at start-up, with one real generation.

Why a generation and not a formula: a layer's largest input depends on the weights, the prompt and the step,
so the scale is learned the way TensorRT's and MLPerf's fp8 SDXL learn theirs, from running the model. Here:
two different prompts, the full denoising trajectory of an ensemble request (every step of the base and the
refiner), at the first warm-up size, eager (before anything compiles, so the compiled graphs see the final
scales). Part of start-up, like the warm-up: with the full-size models on an H200 the engine's build and its
calibration took 10.6 s together (run 46; the calibration alone was not timed, predicted 2-5 s).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from imagesmith.config import Settings
from imagesmith.engine.fast import compiled_calls_set_aside
from imagesmith.engine.fp8 import calibrate_static_scales, static_layers
from imagesmith.engine.models import unets_of

log = logging.getLogger(__name__)

CALIBRATION_PROMPTS = (
    "a photograph of a mountain lake at sunrise, mist over the water",
    "a detailed illustration of a busy city street at night, neon signs",
)
CALIBRATION_STEPS = 20


def calibrate_fp8(engine: Any, settings: Settings) -> str | None:
    """Calibrate the engine's static fp8 layers; return the lever line for health, or None without any."""
    from imagesmith.engine.engine import BatchItem
    from imagesmith.schemas import GenerationRequest

    unets = unets_of(engine.models.base, engine.models.refiner)
    layers = static_layers(unets)
    if not layers:
        return None
    width, height = settings.warmup_size_list()[0]
    requests = [
        GenerationRequest(
            prompt=prompt, width=width, height=height, num_inference_steps=CALIBRATION_STEPS, seed=seed
        )
        for seed, prompt in enumerate(CALIBRATION_PROMPTS)
    ]

    def generate() -> None:
        for outcome in engine.generate_batch([BatchItem(request) for request in requests]):
            if isinstance(outcome, BaseException):
                raise outcome

    began = time.perf_counter()
    # Eager: compile wraps the modules before this runs (apply_speed_levers), and a compile now would bake in
    # the calibrating layers' extra reduction.
    with compiled_calls_set_aside(engine):
        reached = calibrate_static_scales(layers, generate)
    took = time.perf_counter() - began
    log.info(
        "fp8 static scales calibrated for %d of %d layers in %.1fs (%dx%d, %d prompts, %d steps)",
        reached,
        len(layers),
        took,
        width,
        height,
        len(requests),
        CALIBRATION_STEPS,
    )
    return f"fp8 static scales calibrated at start-up ({reached} of {len(layers)} layers)"
