"""The two stages of one generation, driven through diffusers' own arguments.

    1. base: txt2img to latents (stopping at high_noise_frac in ensemble mode)
    2. refine: ensemble (denoising_start=high_noise_frac), img2img (strength), or nothing
       - if the refiner is missing or fails: ensemble finishes the schedule with the base; img2img keeps the
         base latents; either way the image is marked unrefined with the reason
    3. decode: our own, one image at a time, with the NaN/black guard

Every stage returns latents (output_type="latent"), so decoding and its fallback live in one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from imagesmith.engine import empty_negative
from imagesmith.engine.encode_ahead import EncodeAhead
from imagesmith.engine.progress import CancelToken, GenerationCanceled, ProgressCallback, ProgressEvent
from imagesmith.engine.prompt_cache import PromptEmbeddingCache, zero_negative_rows
from imagesmith.engine.schedulers import loaded_scheduler_config, make_scheduler, remember_scheduler_config
from imagesmith.engine.size_routing import latent_size_of_image
from imagesmith.engine.stage_clock import StageClock, StageStart, stage_start
from imagesmith.engine.starting_noise import StartingNoise
from imagesmith.schemas import MAX_STEPS, RefineMode, ResolvedRequest, StageReport

BatchKey = tuple[object, ...]


def batch_key(request: ResolvedRequest) -> BatchKey:
    """Requests with equal keys can share one pipeline pass and still each get the image they would alone:
    everything that is one scalar per pipeline call must match."""
    return (
        request.width,
        request.height,
        request.num_inference_steps,
        request.guidance_scale,
        request.refine_mode,
        request.high_noise_frac,
        request.refine_steps,
        request.refine_strength,
        request.scheduler,
        bool(request.negative_prompt),
    )


log = logging.getLogger(__name__)


@dataclass
class BatchMember:
    """One request inside a batch: its rows of the latents, its progress callback and cancel token."""

    request: ResolvedRequest
    seeds: list[int]
    rows: slice
    on_progress: ProgressCallback | None = None
    cancel: CancelToken | None = None

    @property
    def canceled(self) -> bool:
        return self.cancel is not None and self.cancel.canceled


@dataclass
class StageRun:
    """One pipeline pass over a batch of compatible requests (the same size, steps, mode, scheduler and
    guidance; see batch_key). Counts steps as they happen, so each result says what really ran."""

    members: list[BatchMember]
    # The engine's cache across requests, or one for this pass only (texts still encoded once).
    prompt_cache: PromptEmbeddingCache = field(default_factory=PromptEmbeddingCache.for_one_pass)
    started: float = field(default_factory=time.perf_counter)
    # Times each stage without making the host wait for the GPU at its end (engine/stage_clock.py).
    clock: StageClock = field(default_factory=StageClock)
    # Set when the caller stops waiting (Ctrl-C): the whole pass stops within a step.
    interrupt: CancelToken = field(default_factory=CancelToken)
    # Encodes the queued jobs' prompts between the base stage's steps (engine/encode_ahead.py); None: off.
    encode_ahead: EncodeAhead | None = None
    _steps: int = 0

    @property
    def request(self) -> ResolvedRequest:
        """The settings every member shares."""
        return self.members[0].request

    @property
    def seeds(self) -> list[int]:
        return [seed for member in self.members for seed in member.seeds]

    def callback(self, stage: str) -> Any:
        """A diffusers callback_on_step_end that reports progress and stops within one step on cancel."""
        self._steps = 0
        # Only the base stage's pipeline encodes (the refiner's embeddings are sliced from the base's).
        encode_ahead = self.encode_ahead.after_each_step() if self.encode_ahead and stage == "base" else None

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            self._steps += 1
            self.tell(stage, self._steps, int(getattr(pipe, "num_timesteps", 0) or 0), tensors.get("latents"))
            # A batch stops when every member has canceled; a member that cancels alone is dropped at the end.
            if self.all_canceled:
                raise GenerationCanceled(f"canceled during {stage} at step {self._steps}")
            if encode_ahead is not None:
                encode_ahead(pipe)
            return tensors

        return on_step_end

    def tell(self, stage: str, step: int, total: int, latents: Any = None) -> None:
        """Each member still waiting hears where the pass is (its own rows of the latents, when given)."""
        elapsed = time.perf_counter() - self.started
        for member in self.members:
            if member.on_progress is not None and not member.canceled:
                rows = None if latents is None else latents[member.rows]
                member.on_progress(ProgressEvent(stage, step, total, elapsed, rows))

    def finish_stage(self, name: str, began: StageStart, steps: int | None = None) -> None:
        """The stage's work is queued; its time is known once settle_stages says so."""
        self.clock.finish(name, began, self._steps if steps is None else steps)

    def settle_stages(self) -> list[StageReport]:
        """Every stage's report, once the pass's results are on the host (so waiting costs nothing)."""
        return self.clock.settle()

    def settle_stages_after_failure(self) -> None:
        """A pass that stopped (a cancel, an error) still logs the stages it finished. The GPU may be what
        failed: then their times are given up, with a line that says so."""
        try:
            self.clock.settle()
        except Exception as error:  # a CUDA error raised again by the wait: the pass's own error says more
            log.warning("the finished stages' times could not be read: %s", error)

    @property
    def all_canceled(self) -> bool:
        return self.interrupt.canceled or all(member.canceled for member in self.members)

    def check_cancel(self) -> None:
        if self.all_canceled:
            raise GenerationCanceled("generation canceled")


def planned_stage_steps(request: ResolvedRequest, scheduler_config: Any) -> dict[str, int]:
    """Steps per stage before running: the ensemble's split depends on the scheduler's timesteps (Karras and
    UniPC spacings put a different number of steps above the cut than int(steps x high_noise_frac))."""
    steps = request.num_inference_steps
    if request.refine_mode is RefineMode.IMG2IMG:
        return {
            "base": steps,
            "refine": min(int(request.refine_steps * request.refine_strength), request.refine_steps),
        }
    if request.refine_mode is RefineMode.NONE:
        return {"base": steps}
    scheduler = make_scheduler(request.scheduler, scheduler_config)
    scheduler.set_timesteps(steps)
    train_steps = scheduler.config.num_train_timesteps
    # The cut diffusers applies for denoising_end (base) and denoising_start (refiner).
    cutoff = round(train_steps - request.high_noise_frac * train_steps)
    base = int((scheduler.timesteps >= cutoff).sum().item())
    return {"base": base, "refine": len(scheduler.timesteps) - base}


def empty_stage_problem(
    request: ResolvedRequest, scheduler_config: Any, names: Mapping[str, str] | None = None
) -> str | None:
    """Why an ensemble request would leave a stage no step with this scheduler config, or None. `names`: how
    to call the two fields in the message (the CLI's options), else the fields' own names."""
    if request.refine_mode is not RefineMode.ENSEMBLE:
        return None
    planned = planned_stage_steps(request, scheduler_config)
    if planned["base"] >= 1 and planned["refine"] >= 1:
        return None
    split, steps = (
        (names or {}).get("high_noise_frac", "high_noise_frac"),
        (names or {}).get("num_inference_steps", "num_inference_steps"),
    )
    # The fix names the fewest steps that work, and only where the steps' limit allows some (at 150 steps
    # "raise the steps" was advice no one could follow).
    fewest = next(
        (
            n
            for n in range(request.num_inference_steps + 1, MAX_STEPS + 1)
            if min(
                planned_stage_steps(
                    request.model_copy(update={"num_inference_steps": n}), scheduler_config
                ).values()
            )
            >= 1
        ),
        None,
    )
    fix = (
        f"raise {steps} to {fewest} or more, or move {split} away from 0 and 1"
        if fewest is not None
        else f"move {split} closer to 0.5"
    )
    return (
        f"{split} {request.high_noise_frac} with {request.num_inference_steps} steps of "
        f"{request.scheduler.value} gives the base {planned['base']} step(s) and the refiner "
        f"{planned['refine']}; {fix}"
    )


def _latents_dtype(pipe: Any) -> torch.dtype:
    # What SDXL's pipeline makes its noise in: its prompt embeddings' dtype, which encode_prompt sets to the
    # second text encoder's (the UNet's without one).
    encoder = pipe.text_encoder_2 if pipe.text_encoder_2 is not None else pipe.unet
    return encoder.dtype


def _common_args(run: StageRun, generators: list[torch.Generator], pipe: Any, role: str) -> dict[str, Any]:
    prompts = [m.request.prompt for m in run.members for _ in m.seeds]
    negatives = [m.request.negative_prompt for m in run.members for _ in m.seeds]
    # None (not "") lets SDXL use zeros for an empty negative prompt, as it was trained. batch_key keeps
    # requests with and without a negative prompt apart, so each image is what it would be alone.
    negatives_or_none = negatives if any(negatives) else None
    text = run.prompt_cache.pipeline_args(pipe, role, prompts, negatives_or_none, run.request.guidance_scale)
    # The base's cross-attentions may skip the zero-text rows (engine/empty_negative.py; a no-op unless wrapped).
    empty_negative.set_for_pass(
        pipe.unet, zero_negative_rows(pipe, negatives_or_none, run.request.guidance_scale)
    )
    return {
        **text,
        "guidance_scale": run.request.guidance_scale,
        "generator": generators,
        "num_images_per_prompt": 1,
        "output_type": "latent",
        "callback_on_step_end_tensor_inputs": ["latents"],
    }


def run_base(
    base: Any,
    run: StageRun,
    generators: list[torch.Generator],
    stop_at: float | None,
    noise: StartingNoise | None = None,
) -> torch.Tensor:
    """`noise`: the engine's starting noise (engine/starting_noise.py); None: diffusers makes its own."""
    request = run.request
    base.scheduler = make_scheduler(request.scheduler, loaded_scheduler_config(base))
    began = stage_start(base._execution_device)
    drawn = None
    if noise is not None:  # drawn while the prompts are encoded
        height, width = latent_size_of_image(request.width, request.height, base.vae_scale_factor)
        shape = (int(base.unet.config.in_channels), height, width)
        drawn = noise.start(generators, shape, _latents_dtype(base), base._execution_device)
    args = _common_args(run, generators, base, "base")
    if drawn is not None:
        args["latents"] = drawn()
    latents = base(
        **args,
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        denoising_end=stop_at,
        callback_on_step_end=run.callback("base"),
    ).images
    run.finish_stage("base", began)
    return latents


def run_refiner(
    refiner: Any,
    run: StageRun,
    generators: list[torch.Generator],
    latents: torch.Tensor,
    mode: RefineMode,
    stage: str = "refine",
) -> torch.Tensor:
    """Ensemble: finish the base's schedule from high_noise_frac. img2img: re-noise to refine_strength, denoise."""
    request = run.request
    role = "base" if stage == "base_finish" else "refiner"  # whose text encoders make the embeddings
    refiner.scheduler = make_scheduler(request.scheduler, loaded_scheduler_config(refiner))
    if mode is RefineMode.ENSEMBLE:
        stage_args = {
            "num_inference_steps": request.num_inference_steps,
            "denoising_start": request.high_noise_frac,
        }
    else:
        stage_args = {"num_inference_steps": request.refine_steps, "strength": request.refine_strength}
    began = stage_start(refiner._execution_device)
    refined = refiner(
        **_common_args(run, generators, refiner, role),
        image=latents,  # 4-channel input is taken as latents, not encoded again
        **stage_args,
        callback_on_step_end=run.callback(stage),
    ).images
    run.finish_stage(stage, began)
    return refined


def finish_with_base(
    base: Any, run: StageRun, generators: list[torch.Generator], latents: torch.Tensor
) -> torch.Tensor:
    """The ensemble's fallback: the base denoises the rest of the schedule, so the picture is complete."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    # The base's own modules (no copy) under img2img's call logic. Built directly, not with from_pipe: diffusers'
    # from_pipe casts every module to its dtype argument, fp32 when none is given, and these modules are the
    # base's, shared with the refiner: a bf16 engine would be left half in fp32 (its next decode failed).
    finisher: Any = StableDiffusionXLImg2ImgPipeline(
        **base.components,
        requires_aesthetics_score=False,  # the base is conditioned on sizes, not on an aesthetic score
        force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt,
        add_watermarker=False,  # it returns latents; nothing to watermark
    )
    finisher.set_progress_bar_config(disable=True)
    remember_scheduler_config(finisher, loaded_scheduler_config(base))
    return run_refiner(finisher, run, generators, latents, RefineMode.ENSEMBLE, stage="base_finish")


def free_cuda_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
