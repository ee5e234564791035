"""Generation on the tiny model: the real diffusers code path, on the CPU, at small sizes."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from imagesmith.config import Settings
from imagesmith.engine import CancelToken, Engine, GenerationCanceled, ProgressEvent
from imagesmith.schemas import GenerationRequest, RefineMode, draw_seed

SMALL = {"width": 96, "height": 64, "num_inference_steps": 10}


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("mode", ["ensemble", "img2img", "none"])
def test_each_mode_makes_images_of_the_requested_size(tiny_engine: Engine, mode: str) -> None:
    result = tiny_engine.generate(
        GenerationRequest(prompt="a lighthouse", refine_mode=mode, num_images=2, seed=3, **SMALL)
    )
    assert [image.size for image in result.images] == [(96, 64), (96, 64)]
    meta = result.metadata
    assert meta.refined is (mode != "none")
    assert meta.refine_mode_ran.value == mode
    steps = {stage.name: stage.steps for stage in meta.stages}
    expected = {
        "ensemble": {"base": 8, "refine": 2, "decode": 2},
        "img2img": {"base": 10, "refine": 9, "decode": 2},
        "none": {"base": 10, "decode": 2},
    }[mode]
    assert steps == expected
    assert all(pixels(image).std() > 0 for image in result.images)


@pytest.mark.parametrize("request_given", ["a red bicycle", {"prompt": "a red bicycle"}, None])
def test_generate_names_what_it_takes_when_given_something_else(
    tiny_engine: Engine, request_given: Any
) -> None:
    """A prompt string came out of the pipeline as "'str' object has no attribute 'width'"."""
    with pytest.raises(TypeError) as caught:
        tiny_engine.generate(request_given)
    assert str(caught.value).startswith("Engine.generate takes a GenerationRequest, e.g. GenerationRequest(")


def test_start_and_generate_name_what_their_other_arguments_take(tiny_engine: Engine) -> None:
    """None for the settings, or a string for the cancel token, came out as AttributeErrors from inside."""
    with pytest.raises(TypeError, match=r"Engine.start takes a Settings, .* got NoneType"):
        Engine.start(None)  # type: ignore[arg-type]
    request = GenerationRequest(prompt="a fox", seed=1, **SMALL)
    with pytest.raises(TypeError, match=r"cancel takes a CancelToken .* got str"):
        tiny_engine.generate(request, cancel="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_progress takes a function of one event"):
        tiny_engine.generate(request, on_progress="print")  # type: ignore[arg-type]


def test_same_seed_reproduces_and_other_seeds_differ(tiny_engine: Engine) -> None:
    first = tiny_engine.generate(GenerationRequest(prompt="a fox", seed=1234, **SMALL))
    again = tiny_engine.generate(GenerationRequest(prompt="a fox", seed=1234, **SMALL))
    other = tiny_engine.generate(GenerationRequest(prompt="a fox", seed=1235, **SMALL))
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert np.abs(pixels(first.images[0]) - pixels(other.images[0])).mean() > 1.0


def test_any_image_of_a_batch_can_be_reproduced_alone(tiny_engine: Engine) -> None:
    batch = tiny_engine.generate(GenerationRequest(prompt="a fox", seed=50, num_images=3, **SMALL))
    assert batch.metadata.seeds == [50, 51, 52]
    alone = tiny_engine.generate(GenerationRequest(prompt="a fox", seed=52, **SMALL))
    # Batched and single matrix products round differently on the CPU: at most one 8-bit level apart.
    assert np.abs(pixels(batch.images[2]) - pixels(alone.images[0])).max() <= 2


def test_a_missing_seed_is_drawn_returned_and_63_bit(tiny_engine: Engine) -> None:
    result = tiny_engine.generate(GenerationRequest(prompt="a fox", **SMALL))
    seed = result.metadata.seeds[0]
    assert 0 <= seed < 2**63
    assert f"Seed: {seed}," in result.parameters(0)
    assert max(draw_seed() for _ in range(64)) > 2**48  # not a 16- or 32-bit draw


def test_refiner_failure_falls_back_to_the_base_image(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    refiner = tiny_engine.models.refiner

    def broken_unet(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(refiner.unet, "forward", broken_unet)
    for mode in ("ensemble", "img2img"):
        result = tiny_engine.generate(GenerationRequest(prompt="a fox", refine_mode=mode, seed=9, **SMALL))
        meta = result.metadata
        assert not meta.refined and meta.refine_mode_ran is RefineMode.NONE
        assert "refiner failed: RuntimeError: CUDA out of memory (simulated)" in (
            meta.not_refined_reason or ""
        )
        assert result.images[0].size == (96, 64) and pixels(result.images[0]).std() > 0
        assert "Not refined" in result.parameters(0)
    monkeypatch.undo()
    # The ensemble fallback lets the base finish the schedule; its result equals a base-only run's.
    names = [stage.name for stage in meta.stages]
    assert names == ["base", "decode"]  # img2img keeps the full base pass


def test_ensemble_fallback_finishes_the_schedule_with_the_base(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        tiny_engine.models.refiner.unet, "forward", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom"))
    )
    result = tiny_engine.generate(GenerationRequest(prompt="a fox", seed=5, **SMALL))
    assert [(s.name, s.steps) for s in result.metadata.stages] == [
        ("base", 8),
        ("base_finish", 2),
        ("decode", 1),
    ]


def test_no_refiner_configured_decodes_base_and_says_why(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_engine.models, "refiner", None)
    monkeypatch.setattr(tiny_engine.models, "refiner_error", "could not load the refiner model 'x': missing")
    result = tiny_engine.generate(GenerationRequest(prompt="a fox", refine_mode="img2img", seed=5, **SMALL))
    assert not result.metadata.refined
    assert "refiner unavailable (failed: could not load the refiner model 'x'" in (
        result.metadata.not_refined_reason or ""
    )
    assert pixels(result.images[0]).std() > 0


def test_nan_decode_is_redone_in_fp32(tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16-bit VAE that overflows (NaN) is decoded again in fp32, and the image says so."""
    vae = tiny_engine.models.base.vae
    decoder = vae.decoder
    original_forward = decoder.forward

    def overflowing(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original_forward(*args, **kwargs)
        return out if out.dtype == torch.float32 else torch.full_like(out, float("nan"))

    monkeypatch.setattr(decoder, "forward", overflowing)
    monkeypatch.setattr(tiny_engine, "plan", dataclasses.replace(tiny_engine.plan, vae_dtype_name="bf16"))
    vae.to(torch.bfloat16)
    try:
        result = tiny_engine.generate(GenerationRequest(prompt="a fox", refine_mode="none", seed=5, **SMALL))
    finally:
        vae.to(torch.float32)
    assert result.metadata.images[0].decoded_in_fp32_retry
    assert np.isfinite(pixels(result.images[0])).all() and pixels(result.images[0]).max() > 0
    assert next(vae.parameters()).dtype == torch.float32


def test_progress_reports_each_stage_step_by_step(tiny_engine: Engine) -> None:
    events: list[ProgressEvent] = []
    tiny_engine.generate(GenerationRequest(prompt="a fox", seed=1, **SMALL), on_progress=events.append)
    seen = [(e.stage, e.step, e.total) for e in events]
    denoising = [("base", i, 8) for i in range(1, 9)] + [("refine", i, 2) for i in range(1, 3)]
    # The decode is heard as a stage of one, started then done, so a bar does not sit on the last step through it.
    assert seen == [*denoising, ("decode", 0, 1), ("decode", 1, 1)]
    assert all(later.elapsed_s >= earlier.elapsed_s for earlier, later in itertools.pairwise(events))
    assert events[0].latents.shape == (1, 4, 8, 12)
    assert events[-1].latents is None  # no latents to preview in the decode's events


def test_cancel_stops_within_one_step(tiny_engine: Engine) -> None:
    token = CancelToken()
    steps: list[int] = []

    def cancel_at_third_step(event: ProgressEvent) -> None:
        steps.append(event.step)
        if event.step == 3:
            token.cancel()

    with pytest.raises(GenerationCanceled):
        tiny_engine.generate(
            GenerationRequest(prompt="a fox", seed=1, **SMALL), on_progress=cancel_at_third_step, cancel=token
        )
    assert steps == [1, 2, 3]
    # The engine is usable right after a cancel.
    assert tiny_engine.generate(GenerationRequest(prompt="a fox", seed=1, **SMALL)).images


def test_one_generation_at_a_time_across_threads(tiny_engine: Engine) -> None:
    """Diffusers pipelines keep per-call state on themselves: concurrent calls must never interleave."""
    active, overlaps, lock = [0], [0], threading.Lock()

    def watch(event: ProgressEvent) -> None:
        with lock:
            active[0] += 1
            overlaps[0] = max(overlaps[0], active[0])
        time.sleep(0.001)
        with lock:
            active[0] -= 1

    results: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda s=s: results.append(
                tiny_engine.generate(
                    GenerationRequest(
                        prompt="a fox", seed=s, scheduler=["euler", "dpmpp_2m", "ddim"][s], **SMALL
                    ),
                    on_progress=watch,
                )
            )
        )
        for s in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps[0] == 1 and len(results) == 3
    alone = tiny_engine.generate(GenerationRequest(prompt="a fox", seed=1, scheduler="dpmpp_2m", **SMALL))
    threaded = next(r for r in results if r.metadata.seeds == [1])
    assert np.array_equal(pixels(threaded.images[0]), pixels(alone.images[0]))


def test_async_entry_point_leaves_the_event_loop_free(tiny_engine: Engine) -> None:
    async def scenario() -> tuple[int, Any]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        result = await tiny_engine.generate_async(GenerationRequest(prompt="a fox", seed=2, **SMALL))
        task.cancel()
        return ticks, result

    ticks, result = asyncio.run(scenario())
    assert result.images and ticks >= 3


@pytest.mark.parametrize(
    "scheduler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc"]
)
@pytest.mark.parametrize("mode", ["ensemble", "img2img", "none"])
def test_planned_steps_match_what_runs(tiny_engine: Engine, scheduler: str, mode: str) -> None:
    """Progress totals and ETAs come from the plan: it must count the steps each stage really runs."""
    request = GenerationRequest(
        prompt="x", scheduler=scheduler, refine_mode=mode, high_noise_frac=0.7, **SMALL
    )
    ran = {s.name: s.steps for s in tiny_engine.generate(request).metadata.stages if s.name != "decode"}
    assert tiny_engine.planned_steps(request) == ran


def test_the_base_finish_leaves_a_16_bit_engine_in_its_dtype(tiny_settings: Settings) -> None:
    """The ensemble's fallback runs the base's own modules under img2img's logic; it must not cast them (the
    refiner shares the text encoder and VAE). bf16 on the CPU stands in for a GPU's 16-bit plan."""
    engine = Engine.start(tiny_settings.with_changes(precision="bf16"))
    assert engine.plan.dtype_name == "bf16"
    engine.models.refiner = None  # as when none is configured or it failed to load
    request = GenerationRequest(prompt="a fox", seed=5, **SMALL)
    for _ in range(2):  # the second request is the one that used to fail, in the decode
        result = engine.generate(request)
        assert [stage.name for stage in result.metadata.stages] == ["base", "base_finish", "decode"]
    base = engine.models.base
    assert {base.unet.dtype, base.text_encoder.dtype, base.text_encoder_2.dtype, base.vae.dtype} == {
        torch.bfloat16
    }
    assert pixels(result.images[0]).std() > 0


def test_a_request_scheduler_choice_does_not_carry_into_the_next_request(tiny_settings: Settings) -> None:
    """Each request's scheduler is built from the model's loaded config, not from the previous request's
    scheduler (a Karras request used to leave Karras sigmas on for the next Euler request)."""
    euler = GenerationRequest(prompt="a fox", seed=5, scheduler="euler", **SMALL)
    karras = GenerationRequest(prompt="a fox", seed=5, scheduler="dpmpp_2m_karras", **SMALL)
    fresh = Engine.start(tiny_settings)
    expected_steps = fresh.planned_steps(euler)
    expected = pixels(fresh.generate(euler).images[0])
    used = Engine.start(tiny_settings)
    used.generate(karras)
    assert used.planned_steps(euler) == expected_steps
    result = used.generate(euler)
    assert [(s.name, s.steps) for s in result.metadata.stages][:2] == list(expected_steps.items())
    assert np.abs(pixels(result.images[0]) - expected).max() <= 1


def test_each_member_of_a_batch_gives_its_own_reason_for_no_refinement(tiny_engine: Engine) -> None:
    from imagesmith.engine import BatchItem

    size = {"width": 64, "height": 64, "num_inference_steps": 4, "num_images": 1}
    requests = [
        GenerationRequest(prompt="a", seed=1, use_refinement=False, **size),
        GenerationRequest(prompt="b", seed=2, refine_mode="none", **size),
        GenerationRequest(prompt="c", seed=3, high_quality=False, **size),
    ]
    outcomes = tiny_engine.generate_batch([BatchItem(request) for request in requests])
    reasons = [outcome.metadata.not_refined_reason for outcome in outcomes]  # type: ignore[union-attr]
    assert reasons == ["refinement off (use_refinement=false)", "refine_mode none", "high_quality=false"]
    assert all(outcome.metadata.batch_size == 3 for outcome in outcomes)  # type: ignore[union-attr]


def test_an_ensemble_whose_scheduler_leaves_a_stage_empty_is_refused_naming_the_fields(
    tiny_engine: Engine,
) -> None:
    """The split follows the scheduler's timesteps: 4 DPM++ steps at 0.8 all fall in the base, which the
    schema's int(steps x frac) check cannot see. The engine refuses before running rather than call the base
    image refined."""
    from imagesmith.engine import GenerationError

    request = GenerationRequest(
        prompt="a fox", seed=5, scheduler="dpmpp_2m", width=64, height=64, num_inference_steps=4
    )
    assert tiny_engine.planned_steps(request) == {"base": 4, "refine": 0}
    with pytest.raises(
        GenerationError, match=r"gives the base 4 step\(s\) and the refiner 0; raise num_inference_steps"
    ):
        tiny_engine.generate(request)
    enough = request.model_copy(update={"num_inference_steps": 10})
    assert [s.name for s in tiny_engine.generate(enough).metadata.stages] == ["base", "refine", "decode"]
