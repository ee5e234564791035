"""The engine: `Engine.start(settings)` once, then `generate(request)` per request. Nothing else.

It owns the pipelines and lets one generation at a time use them (diffusers pipelines keep per-call state on
themselves), so the CLI, the HTTP worker and a Ray replica can all drive the same object safely.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from imagesmith.config import Settings
from imagesmith.engine.attention import attention_priority
from imagesmith.engine.cpu_threads import apply_cpu_threads
from imagesmith.engine.decode import decode_latents
from imagesmith.engine.encode_ahead import EncodeAhead
from imagesmith.engine.encoder_graphs import installed, text_encoders
from imagesmith.engine.execution_device import pin_pipelines
from imagesmith.engine.fast import (
    apply_speed_levers,
    compiled_modules,
    failed_on_shared_graphs,
    give_up_shared_graphs,
    no_compiling_on_requests,
    note_where_the_pass_failed,
    raised_in_compiled_code,
    records_cuda_graphs,
    serve_eager_from_now,
    take_shared_graph_failures,
)
from imagesmith.engine.fp8_calibration import calibrate_fp8
from imagesmith.engine.gpu_thread import GpuThread
from imagesmith.engine.hardware import HardwarePlan, needs_tiling, plan_hardware, probe_device
from imagesmith.engine.host_pixels import HostPixels, keep_pillow_blocks
from imagesmith.engine.models import LoadedModels, load_models
from imagesmith.engine.output import a1111_parameters, encode_image
from imagesmith.engine.pipeline import (
    BatchMember,
    StageRun,
    batch_key,
    empty_stage_problem,
    finish_with_base,
    free_cuda_memory,
    planned_stage_steps,
    run_base,
    run_refiner,
)
from imagesmith.engine.progress import DECODE_STAGE, CancelToken, GenerationCanceled, ProgressCallback
from imagesmith.engine.prompt_cache import PromptEmbeddingCache
from imagesmith.engine.schedulers import loaded_scheduler_config
from imagesmith.engine.stage_clock import stage_start
from imagesmith.engine.starting_noise import StartingNoise
from imagesmith.schemas import (
    MAX_SEED,
    GenerationMetadata,
    GenerationRequest,
    ImageReport,
    RefineMode,
    ResolvedRequest,
    draw_seed,
)

log = logging.getLogger(__name__)


@dataclass
class BatchItem:
    """One request handed to generate_batch, with its own progress callback and cancel token."""

    request: GenerationRequest | ResolvedRequest
    on_progress: ProgressCallback | None = None
    cancel: CancelToken | None = None


class GenerationError(RuntimeError):
    """A generation failed for a reason the caller can act on (out of memory, ...). The engine stays usable."""


@dataclass
class GenerationResult:
    images: list[Image.Image]
    metadata: GenerationMetadata

    def parameters(self, index: int) -> str:
        return a1111_parameters(self.metadata, index)

    def encoded(self, index: int) -> bytes:
        """Image `index` as file bytes in the requested format, its parameters embedded."""
        return encode_image(self.images[index], self.metadata.request.output_format, self.parameters(index))


def seeds_for(request: ResolvedRequest) -> list[int]:
    first = request.seed if request.seed is not None else draw_seed()
    return [(first + index) % (MAX_SEED + 1) for index in range(request.num_images)]


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the starting noise is the same on every device, and image i depends only on seed i,
    # so any one image of a batch can be reproduced alone.
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def refinement_off_reason(request: ResolvedRequest) -> str:
    """Why a request ran without the refiner by its own choice. Requests that differ here can share a batch
    (batch_key holds the resolved refine_mode only), so each member's reason is its own."""
    if not request.use_refinement:
        return "refinement off (use_refinement=false)"
    return "refine_mode none" if request.high_quality else "high_quality=false"


def encoder_graph_failures(models: LoadedModels) -> list[str]:
    """Text encoders whose CUDA graph could not be recorded (engine/encoder_graphs.py): they run eager, and health
    says so next to the levers, as it does for a compile that fell back."""
    graphs = map(installed, text_encoders(models.base, models.refiner))
    failed = [graph for graph in graphs if graph is not None and graph.failure]
    return [
        f"{type(graph.module).__name__} CUDA graph failed, eager instead ({graph.failure})"
        for graph in failed
    ]


def encode_ahead_refused(engine: Engine) -> str | None:
    """Why IMAGESMITH_ENCODE_AHEAD cannot work with this engine, or None when it can."""
    if engine.prompt_cache is None:
        return "it keeps what it encodes in the prompt cache, which is off (IMAGESMITH_PROMPT_CACHE_SIZE=0)"
    if engine.plan.offload != "none":
        return (
            f"with offload={engine.plan.offload} the text encoders would move the UNet off the GPU mid-stage"
        )
    return None


def encode_ahead_for(engine: Engine, settings: Settings) -> EncodeAhead | None:
    """IMAGESMITH_ENCODE_AHEAD for this engine: None when the setting is off or the engine refuses it (the
    reason logged)."""
    if not settings.encode_ahead:
        return None
    why_not = encode_ahead_refused(engine)
    if why_not is None and engine.prompt_cache is not None:
        return EncodeAhead(engine.prompt_cache)
    log.info("encode ahead off: %s", why_not)
    return None


class Engine:
    def __init__(self, models: LoadedModels, plan: HardwarePlan, prompt_cache_size: int = 64) -> None:
        self.models = models
        self.plan = plan
        # Without offload the pipelines' execution device cannot change: answered at once instead of searched
        # for on every use (~10 ms of host time each, ten times a batch of 8: engine/execution_device.py).
        pin_pipelines([pipe for pipe in (models.base, models.refiner) if pipe is not None], plan)
        # One pass at a time, always on this thread: the pipelines, the prompt cache and torch's CUDA-graph
        # trees are used from it alone.
        self._gpu = GpuThread()
        weakref.finalize(self, self._gpu.close)  # a dropped engine's thread ends (and lets go of its graphs)
        # torch's CPU threads bounded by the CPUs the process may use (engine/cpu_threads.py). Set before the GPU
        # thread's first operator: a thread takes the process's count then and keeps it.
        apply_cpu_threads(plan.cpu_threads)
        self.levers: list[str] = []
        self.startup: dict[str, float] = {}  # filled by whoever warms the engine up (the service)
        # Whether compiled modules record CUDA graphs (IMAGESMITH_COMPILE=reduce-overhead): warm-up records
        # one per batch size then, so no request has to.
        self.records_cuda_graphs = False
        # False after the service's warm-up (fast.stop_compiling_on_requests): passes run what was compiled and
        # nothing new compiles.
        self.compiles_on_request = True
        # Used on the GPU thread only, like the pipelines.
        self.prompt_cache: PromptEmbeddingCache | None = (
            PromptEmbeddingCache(prompt_cache_size) if prompt_cache_size else None
        )
        # The base's starting noise drawn into a reused (pinned) buffer and uploaded without a sync, the same
        # noise diffusers makes (engine/starting_noise.py); None: diffusers' own (the benchmarks' peer).
        self.starting_noise: StartingNoise | None = StartingNoise()
        # The decoded pixels land in a pinned buffer kept across passes, and Pillow keeps its freed blocks for the
        # next pass's images: no fresh memory to fault in while the GPU waits (engine/host_pixels.py).
        self.host_pixels = HostPixels()
        keep_pillow_blocks()
        # Set by start() with IMAGESMITH_ENCODE_AHEAD: the worker says which prompts are queued, and each pass
        # encodes them between its steps (engine/encode_ahead.py).
        self.encode_ahead: EncodeAhead | None = None
        # Set by close(): the models and buffers are gone, and every later pass is refused. _closing is set as
        # close() begins: passes asked for while it waits for the one running are refused with the same words.
        self.closed = False
        self._closing = False

    @classmethod
    def start(cls, settings: Settings) -> Engine:
        """Probe the device, choose the plan (logged in one line), load the models."""
        # None came out as "'NoneType' object has no attribute 'device'".
        if not isinstance(settings, Settings):
            raise TypeError(
                "Engine.start takes a Settings, e.g. Settings() or get_settings() from imagesmith.config; "
                f"got {type(settings).__name__}"
            )
        device = probe_device(settings.device)
        plan = plan_hardware(device, settings)
        log.info("hardware plan: %s", plan.summary())
        started = time.perf_counter()
        models = load_models(settings, plan)
        engine = cls(models, plan, settings.prompt_cache_size)
        engine.apply_levers(settings)
        log.info(
            "models ready in %.1fs: base=%s refiner=%s",
            time.perf_counter() - started,
            models.sources.base,
            models.sources.refiner
            if models.refiner is not None
            else f"none ({models.refiner_error or 'not configured'})",
        )
        engine.encode_ahead = encode_ahead_for(engine, settings)
        if engine.encode_ahead is not None:
            engine.levers = [*engine.levers, "encode ahead (queued prompts encoded between steps)"]
        return engine

    def apply_levers(self, settings: Settings, plan: HardwarePlan | None = None) -> list[str]:
        """The speed levers (engine/fast.py) on this engine's models, then the static fp8 scales' calibration
        (before anything compiles); sets `levers` and `records_cuda_graphs` and returns the levers. Engine.start
        calls it, and so do the benchmarks that build an engine from their own modules, so that they apply the
        levers the way the service does. `plan`: the one the levers follow (default: the engine's)."""
        levers = apply_speed_levers(self.models.base, self.models.refiner, plan or self.plan, settings)
        if levers:
            log.info("speed levers: %s", ", ".join(levers))
        calibrated = calibrate_fp8(self, settings)
        if calibrated is not None:
            levers.append(calibrated)
        self.levers = levers
        self.records_cuda_graphs = records_cuda_graphs(settings, levers)
        return levers

    def close(self) -> None:
        """Stop this engine for good and give back what it holds. A pass already running or queued finishes
        first; then the GPU thread ends (taking its CUDA graphs with it) and the models, the cached text
        embeddings and the pinned host buffers are let go, and torch's cached GPU memory is returned to the
        driver. Every later pass raises. Calling it again does nothing.

        Why: a library user who is done with the engine (a notebook, a script that goes on to other GPU work)
        otherwise holds ~12 GB of GPU memory until the process ends, since the engine's GPU thread, its graphs
        and its caches keep the models alive. `with Engine.start(settings) as engine:` closes on leaving."""
        self._closing = True
        thread = self._gpu.thread
        self._gpu.close()  # ends the thread after the calls queued before it
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self.closed:
            return
        self.closed = True
        self.models.base = None
        self.models.refiner = None
        self.prompt_cache = None
        self.starting_noise = None
        self.encode_ahead = None
        self.host_pixels = HostPixels()  # the pinned buffer goes with the old one
        gc.collect()  # the pipelines' modules hold reference cycles (hooks, the shared VAE and encoder)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        log.info("engine closed: models and buffers released")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _refuse_if_closed(self) -> None:
        if self._closing:  # set first by close(), and never cleared: covers `closed` too
            raise RuntimeError(
                "this engine is closed (Engine.close() was called): start a new one with Engine.start(settings)"
            )

    @property
    def refiner_status(self) -> str:
        if self.closed:
            return "closed"
        if self.models.refiner is not None:
            return "loaded"
        if self.models.refiner_error:
            return f"failed: {self.models.refiner_error}"
        return "not configured"

    async def generate_async(
        self,
        request: GenerationRequest | ResolvedRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        """Run in a worker thread, so an event loop keeps serving while the GPU works."""
        return await asyncio.to_thread(self.generate, request, on_progress, cancel)

    def generate(
        self,
        request: GenerationRequest | ResolvedRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        if not isinstance(request, GenerationRequest | ResolvedRequest):
            # A prompt string or a dict came out of the pipeline as "'str' object has no attribute 'width'".
            raise TypeError(
                f"Engine.generate takes a GenerationRequest, e.g. GenerationRequest(prompt=...) from "
                f"imagesmith.schemas; got {type(request).__name__}"
            )
        if cancel is not None and not isinstance(cancel, CancelToken):
            raise TypeError(
                "Engine.generate's cancel takes a CancelToken from imagesmith.engine (call its cancel() to stop "
                f"the pass), or None; got {type(cancel).__name__}"
            )
        if on_progress is not None and not callable(on_progress):
            raise TypeError(
                f"Engine.generate's on_progress takes a function of one event, or None; got {on_progress!r}"
            )
        outcome = self.generate_batch([BatchItem(request, on_progress, cancel)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def generate_batch(self, items: list[BatchItem]) -> list[GenerationResult | BaseException]:
        """Several compatible requests (equal batch_key) in one pipeline pass: one result or error per item,
        in order. Each image is the one its request would get alone (its own seeds and generators), up to rounding:
        the batched kernels add in another order, so a pixel can differ by a level or two."""
        self._refuse_if_closed()
        resolved = [
            item.request.resolve() if isinstance(item.request, GenerationRequest) else item.request
            for item in items
        ]
        if len({batch_key(request) for request in resolved}) != 1:
            raise ValueError("generate_batch needs requests with equal batch_key(); split them first")
        empty_stage = self.empty_stage(resolved[0])
        if empty_stage is not None:  # the batch shares the steps and the split, so all of it or none
            return [GenerationError(empty_stage) for _ in items]
        members, row = [], 0
        for request, item in zip(resolved, items, strict=True):
            seeds = seeds_for(request)
            members.append(
                BatchMember(request, seeds, slice(row, row + len(seeds)), item.on_progress, item.cancel)
            )
            row += len(seeds)

        prompts = self.prompt_cache if self.prompt_cache is not None else PromptEmbeddingCache.for_one_pass()
        interrupt = CancelToken()

        def one_pass() -> list[GenerationResult | BaseException]:
            take_shared_graph_failures(self)  # cleared: a failure is judged by its own pass
            # Made here, as the pass starts: its times and ETAs count the pass, not its wait in the queue.
            run = StageRun(
                members=members, prompt_cache=prompts, interrupt=interrupt, encode_ahead=self.encode_ahead
            )
            with attention_priority(self.plan.attention), no_compiling_on_requests(self):
                try:
                    return self._one_pass(run)
                except Exception as error:
                    note_where_the_pass_failed(self, error)  # for `_serve_on_after`, on the caller's thread
                    run.settle_stages_after_failure()  # the stages it finished still get their log lines
                    raise

        def run_pass() -> list[GenerationResult | BaseException]:
            # Every pass, warm-up included, on the engine's one GPU thread (gpu_thread.py says why). A caller
            # interrupted while it waits (Ctrl-C) stops the pass within a step before the interrupt goes on.
            return self._gpu.run(one_pass, on_interrupt=interrupt.cancel)

        # The pass; after a failure in torch.compile's machinery, again on what `_serve_on_after` left: the
        # shared graphs given up (then, should it fail again, eager), or eager.
        for attempt in range(3):
            try:
                return self._outcomes(run_pass, len(items), resolved[0], row)
            except Exception as error:
                then = None if attempt == 2 else self._serve_on_after(error, first_attempt=attempt == 0)
                if then is None:
                    raise
                traceback.clear_frames(error.__traceback__)  # the failed pass's tensors, held by its frames
                del error
                if then == "eager":
                    self._gpu.replace_thread()
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def _serve_on_after(self, error: BaseException, first_attempt: bool) -> str | None:
        """After a failed pass: whether to run it again (None: no), and on what. A compiled pass that failed
        inside torch.compile's machinery (a CUDA-graph capture, a recompile) would, left alone, fail every later
        pass the same way while health says ready. If it failed on the graphs that sizes outside the warm-up
        share (not in CUDA-graph code), only those are given up ("shared"): the warmed-up sizes keep their static
        graphs, and their CUDA graphs the GPU thread they were recorded on. Otherwise the engine serves eager
        ("eager"), from a new GPU thread (the failed capture left this one's allocator state broken). Either way
        the pass runs again so the accepted work is done. A pass that was already queued when another one failed
        finds the modules eager by now: it only needs the retry. Progress restarts from the first step; the
        worker's tracker counts a stage that starts again from where it began."""
        if self._closing or self._gpu.closed:
            # A stop is under way (close(), or the process exiting while a warm-up compiles): the compile it cut
            # short is no sign that the graphs are broken, and there is no thread left to run a retry on.
            return None
        shared = failed_on_shared_graphs(error)
        compiled = bool(compiled_modules(self))
        fell_back = any(lever.startswith("torch.compile failed") for lever in self.levers)
        if not raised_in_compiled_code(error) or not (compiled or (fell_back and first_attempt)):
            return None
        if compiled and shared:
            give_up_shared_graphs(self, error)
            return "shared"
        if compiled:
            serve_eager_from_now(self, error, "a compiled pass failed")
        return "eager"

    def _outcomes(
        self,
        run_pass: Callable[[], list[GenerationResult | BaseException]],
        count: int,
        first: ResolvedRequest,
        rows: int,
    ) -> list[GenerationResult | BaseException]:
        """The pass's outcome per item, with a cancel or an out-of-memory error given to every item."""
        try:
            return run_pass()
        except GenerationCanceled as canceled:
            return [canceled for _ in range(count)]
        except torch.cuda.OutOfMemoryError as error:
            traceback.clear_frames(error.__traceback__)  # the failed pass's tensors, held by its frames
            self._gpu.run(free_cuda_memory)
            failure = GenerationError(
                f"out of GPU memory at {first.width}x{first.height} with {rows} image(s) in the batch; "
                "lower num_images or the size, or set IMAGESMITH_OFFLOAD=model"
            )
            failure.__cause__ = error
            return [failure for _ in range(count)]

    def _one_pass(self, run: StageRun) -> list[GenerationResult | BaseException]:
        request = run.request
        base, refiner = self.models.base, self.models.refiner
        mode = request.refine_mode
        not_refined: str | None = None  # the batch's reason; with refinement off, each member says its own
        if mode is not RefineMode.NONE and refiner is None:
            not_refined = f"refiner unavailable ({self.refiner_status})"

        ensemble = mode is RefineMode.ENSEMBLE
        seeds = run.seeds
        log.info(
            "generating %d image(s) for %d request(s) %dx%d, %d steps, mode=%s, seeds=%s",
            len(seeds),
            len(run.members),
            request.width,
            request.height,
            request.num_inference_steps,
            mode.value,
            seeds,
        )
        latents = run_base(
            base,
            run,
            generators_for(seeds),
            stop_at=request.high_noise_frac if ensemble else None,
            noise=self.starting_noise,
        )
        run.check_cancel()

        refined = False
        if mode is not RefineMode.NONE:
            if refiner is not None:
                try:
                    latents = run_refiner(refiner, run, generators_for(seeds), latents, mode)
                    refined = True
                except GenerationCanceled:
                    raise
                except Exception as error:  # any refiner failure falls back to the base's picture...
                    if compiled_modules(self) and raised_in_compiled_code(error):
                        raise  # ...but a compiled one's: generate_batch serves eager, refined (not for ever unrefined)
                    if isinstance(error, torch.cuda.OutOfMemoryError):
                        traceback.clear_frames(error.__traceback__)  # the refiner's activations go too
                        free_cuda_memory()
                    not_refined = f"refiner failed: {type(error).__name__}: {error}"[:500]
                    log.warning("%s; returning the base image", not_refined)
            if not refined and ensemble:
                # The base stopped at high_noise_frac; let it finish the schedule rather than decode noise.
                latents = finish_with_base(base, run, generators_for(seeds), latents)
            run.check_cancel()

        # A member that canceled during the pass is dropped at its end: its rows are not decoded (a 1024x1024
        # decode is ~35 ms of the GPU), only those of the members still waiting (none canceled: check_cancel).
        wanted = [
            row for member in run.members if not member.canceled for row in range(len(seeds))[member.rows]
        ]
        decoded_at = {row: index for index, row in enumerate(wanted)}
        # The decode has no steps, but it is heard as a stage of one: on a CPU it takes tens of seconds, which a
        # bar or a client would otherwise spend on the last denoising step.
        run.tell(DECODE_STAGE, 0, 1)
        began = stage_start(base._execution_device)
        tiling = needs_tiling(self.plan, request.width, request.height)
        images, fp32_retries = decode_latents(
            base.vae,
            latents if len(wanted) == len(seeds) else latents[wanted],
            self.plan.vae_dtype,
            tiling,
            base._execution_device,
            self.host_pixels,
        )
        run.finish_stage(DECODE_STAGE, began, steps=len(images))
        run.tell(DECODE_STAGE, 1, 1)
        stages = run.settle_stages()  # the pixels are on the host: every stage has ended on the GPU
        total_seconds = time.perf_counter() - run.started
        log.info(
            "generated in %.2fs (%s)%s",
            total_seconds,
            ", ".join(map(str, stages)),
            "" if refined else f"; not refined: {not_refined or refinement_off_reason(request)}",
        )
        outcomes: list[GenerationResult | BaseException] = []
        for member in run.members:
            if member.canceled:
                outcomes.append(GenerationCanceled("generation canceled"))
                continue
            rows = range(len(seeds))[member.rows]
            reason = refinement_off_reason(member.request) if mode is RefineMode.NONE else not_refined
            metadata = GenerationMetadata(
                request=member.request,
                refine_mode_ran=mode if refined else RefineMode.NONE,
                refined=refined,
                not_refined_reason=None if refined else reason,
                seeds=member.seeds,
                stages=stages,
                batch_size=len(seeds),
                total_seconds=total_seconds,
                base_model=self.models.sources.base,
                refiner_model=self.models.sources.refiner if refiner is not None else None,
                device=self.plan.device,
                dtype=self.plan.dtype_name,
                images=[
                    ImageReport(
                        index=index,
                        seed=member.seeds[index],
                        refined=refined,
                        not_refined_reason=None if refined else reason,
                        decoded_in_fp32_retry=fp32_retries[decoded_at[row]],
                        width=images[decoded_at[row]].width,
                        height=images[decoded_at[row]].height,
                    )
                    for index, row in enumerate(rows)
                ],
            )
            outcomes.append(
                GenerationResult(images=[images[decoded_at[row]] for row in rows], metadata=metadata)
            )
        return outcomes

    def empty_stage(self, request: ResolvedRequest) -> str | None:
        """The request schema checks the ensemble's split as int(steps x high_noise_frac); the scheduler's own
        timesteps decide the real one (a 4-step DPM++ run put all 4 steps in the base). A stage with no step
        would run the refiner on nothing, or from pure noise, and still call the image refined."""
        self._refuse_if_closed()
        return empty_stage_problem(request, loaded_scheduler_config(self.models.base))

    def planned_steps(self, request: GenerationRequest | ResolvedRequest) -> dict[str, int]:
        """Denoising steps per stage as this engine will run them (for step totals and ETAs), computed from
        the scheduler's own timesteps the way diffusers splits them at high_noise_frac."""
        self._refuse_if_closed()
        resolved = request.resolve() if isinstance(request, GenerationRequest) else request
        return planned_stage_steps(resolved, loaded_scheduler_config(self.models.base))

    def describe(self) -> dict[str, Any]:
        """For health checks and `doctor`."""
        return {
            "plan": self.plan.summary(),
            "device": self.plan.device,
            "dtype": self.plan.dtype_name,
            "offload": self.plan.offload,
            "base_model": self.models.sources.base,
            "refiner_model": self.models.sources.refiner,
            "refiner": self.refiner_status,
            "speed_levers": self.levers + encoder_graph_failures(self.models),
            "startup": self.startup,
        }
