"""The base's starting noise made by the engine: the noise diffusers' randn_tensor makes from the same
generators, bit for bit, through a reused buffer that no earlier result shares; the pipeline is handed it (it
draws none itself) and the images are those of diffusers' own noise."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl as sdxl_module
from diffusers.utils.torch_utils import randn_tensor

from imagesmith.engine import Engine
from imagesmith.engine.engine import BatchItem, generators_for
from imagesmith.engine.starting_noise import StartingNoise
from imagesmith.schemas import GenerationRequest

SHAPE = (4, 16, 24)


def diffusers_noise(seeds: list[int], dtype: torch.dtype) -> torch.Tensor:
    return randn_tensor(
        (len(seeds), *SHAPE), generator=generators_for(seeds), device=torch.device("cpu"), dtype=dtype
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seeds", [[7], [1, 2, 3]])
def test_the_noise_is_diffusers_noise_bit_for_bit(dtype: torch.dtype, seeds: list[int]) -> None:
    made = StartingNoise().latents(generators_for(seeds), SHAPE, dtype, "cpu")
    assert made.dtype == dtype and made.shape == (len(seeds), *SHAPE)
    assert torch.equal(made, diffusers_noise(seeds, dtype))


def test_the_buffer_is_reused_without_changing_an_earlier_result() -> None:
    noise = StartingNoise()
    # Growing, shrinking and changing dtype: each answer stays right, and none is overwritten by the next.
    calls = [
        ([1, 2], torch.float32),
        ([3, 4, 5, 6], torch.float32),
        ([9], torch.float32),
        ([5], torch.bfloat16),
    ]
    results = [
        (seeds, dtype, noise.latents(generators_for(seeds), SHAPE, dtype, "cpu")) for seeds, dtype in calls
    ]
    for seeds, dtype, made in results:
        assert torch.equal(made, diffusers_noise(seeds, dtype)), seeds


@contextmanager
def counting_diffusers_noise() -> Iterator[list[int]]:
    """Counts the SDXL pipeline's own randn_tensor calls."""
    calls: list[int] = []
    original = sdxl_module.randn_tensor

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    sdxl_module.randn_tensor = counting
    try:
        yield calls
    finally:
        sdxl_module.randn_tensor = original


@contextmanager
def diffusers_own_noise(engine: Engine) -> Iterator[None]:
    noise, engine.starting_noise = engine.starting_noise, None
    try:
        yield
    finally:
        engine.starting_noise = noise


def batch(engine: Engine, mode: str) -> list[np.ndarray]:
    items = [
        BatchItem(
            GenerationRequest(
                prompt=f"a lighthouse {seed}",
                seed=seed,
                width=64,
                height=96,
                num_inference_steps=4,
                refine_mode=mode,
            )
        )
        for seed in (11, 12, 13)
    ]
    outcomes = engine.generate_batch(items)
    return [np.asarray(outcome.images[0]) for outcome in outcomes]  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["none", "ensemble"])
def test_the_pipeline_is_handed_the_noise_and_the_images_are_unchanged(
    tiny_engine: Engine, mode: str
) -> None:
    assert tiny_engine.starting_noise is not None
    with counting_diffusers_noise() as calls:
        made = batch(tiny_engine, mode)
    assert calls == []  # the base drew no noise of its own
    with diffusers_own_noise(tiny_engine), counting_diffusers_noise() as calls:
        own = batch(tiny_engine, mode)
    assert calls == [1]
    for ours, theirs in zip(made, own, strict=True):
        assert np.array_equal(ours, theirs)


def test_the_noise_is_drawn_on_its_own_thread_while_the_prompts_are_encoded(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run 67: drawn on the pass's thread, the draws were GPU idle time (~2 ms an image on the H200 host)."""
    import threading

    from imagesmith.engine import starting_noise

    events: list[tuple[str, str]] = []
    draw = starting_noise._draw

    def recording_draw(*args: object) -> None:
        events.append(("draw", threading.current_thread().name))
        draw(*args)  # type: ignore[arg-type]

    encode = type(tiny_engine.models.base).encode_prompt

    def recording_encode(self: object, *args: object, **kwargs: object) -> object:
        events.append(("encode", threading.current_thread().name))
        return encode(self, *args, **kwargs)  # type: ignore[arg-type]

    drawer = starting_noise._DRAWER

    class RecordingDrawer:
        def submit(self, *args: object) -> object:
            events.append(("submit", threading.current_thread().name))
            return drawer.submit(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(starting_noise, "_draw", recording_draw)
    monkeypatch.setattr(starting_noise, "_DRAWER", RecordingDrawer())
    monkeypatch.setattr(type(tiny_engine.models.base), "encode_prompt", recording_encode)
    batch(tiny_engine, "none")
    threads = dict(events)  # each kind's thread (all encodes run on the pass's thread)
    assert events[0][0] == "submit"  # before the first prompt's encode, on the pass's thread
    assert threads["submit"] == threads["encode"]
    assert threads["draw"].startswith("imagesmith-noise") and threads["draw"] != threads["encode"]
