"""The pipelines' execution device, pinned when nothing is offloaded: answered without walking the models'
modules, the same answer diffusers' search gives, the same images, and never pinned under offload."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from imagesmith.engine import Engine
from imagesmith.engine.engine import BatchItem
from imagesmith.engine.execution_device import (
    is_pinned,
    pin_execution_device,
    pin_pipelines,
    unpin_execution_device,
)
from imagesmith.schemas import GenerationRequest


@contextmanager
def walks_and_visits() -> Iterator[tuple[Counter[str], Counter[str]]]:
    """Counts, by the root's class, Module.named_modules walks (what modules() and diffusers' offload-hook search
    use: a walk's first call, not its recursion) and the modules each walk yields: a walk stopped at its first
    parameter (what a `dtype` lookup does) visits a few, a search through the whole model all of them."""
    walks: Counter[str] = Counter()
    visited: Counter[str] = Counter()
    original = torch.nn.Module.named_modules

    def counting(self: torch.nn.Module, *args: object, **kwargs: object) -> Iterator[object]:
        root = not args and not kwargs.get("prefix")
        if root:
            walks[type(self).__name__] += 1
        for item in original(self, *args, **kwargs):  # type: ignore[arg-type]
            if root:
                visited[type(self).__name__] += 1
            yield item

    torch.nn.Module.named_modules = counting  # type: ignore[assignment,method-assign]
    try:
        yield walks, visited
    finally:
        torch.nn.Module.named_modules = original  # type: ignore[method-assign]


@contextmanager
def module_walks() -> Iterator[Counter[str]]:
    with walks_and_visits() as (walks, _):
        yield walks


@contextmanager
def modules_visited() -> Iterator[Counter[str]]:
    with walks_and_visits() as (_, visited):
        yield visited


@contextmanager
def unpinned(pipe: object) -> Iterator[None]:
    device = pipe._execution_device  # type: ignore[attr-defined]
    unpin_execution_device(pipe)
    try:
        yield
    finally:
        pin_execution_device(pipe, device)


def test_the_engines_pipelines_are_pinned_and_answer_without_a_search(tiny_engine: Engine) -> None:
    base = tiny_engine.models.base
    assert is_pinned(base)
    # Still the pipeline it was, to isinstance checks and to logs.
    assert isinstance(base, StableDiffusionXLPipeline)
    assert type(base).__name__ == "StableDiffusionXLPipeline"
    with module_walks() as walks:
        pinned_answer = base._execution_device
    assert pinned_answer == torch.device("cpu")
    assert not walks
    with unpinned(base), module_walks() as walks:
        searched_answer = base._execution_device
    assert searched_answer == pinned_answer
    assert walks["UNet2DConditionModel"] > 0  # diffusers' own search walks every component
    assert is_pinned(base)


def test_a_pass_never_walks_the_unet(tiny_engine: Engine) -> None:
    """Run 64: every prompt's encode walked all ~4,000 modules of the base pipeline's components."""
    items = [
        BatchItem(
            GenerationRequest(prompt=f"a lighthouse, take {row}", width=64, height=64, num_inference_steps=3)
        )
        for row in range(3)
    ]
    with walks_and_visits() as (walks, visited):
        outcomes = tiny_engine.generate_batch(items)
    assert not any(isinstance(outcome, BaseException) for outcome in outcomes)
    assert walks["UNet2DConditionModel"] == 0, walks
    # Run 67: encode_prompt asked diffusers' get_module_execution_device about each encoder, which walked all of
    # it. What is left is bigG's dtype, asked of its first parameter: the few modules down to it, a lookup.
    assert walks["CLIPTextModel"] == 0, walks
    big_g_modules = len(list(tiny_engine.models.base.text_encoder_2.modules()))
    assert (
        visited["CLIPTextModelWithProjection"] <= 5 * walks["CLIPTextModelWithProjection"] < 5 * big_g_modules
    )
    with unpinned(tiny_engine.models.base), modules_visited() as searched:
        tiny_engine.generate_batch(items)
    assert searched["CLIPTextModel"] >= 3 * len(list(tiny_engine.models.base.text_encoder.modules()))


def test_the_text_encoders_answer_the_pinned_device_and_others_are_still_searched(
    tiny_engine: Engine,
) -> None:
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl as sdxl_module

    base = tiny_engine.models.base
    lookup = sdxl_module.get_module_execution_device
    with module_walks() as walks:
        assert lookup(base.text_encoder) == torch.device("cpu")
        assert lookup(base.text_encoder_2) == torch.device("cpu")
    assert not walks
    with module_walks() as walks:
        assert lookup(torch.nn.Sequential(torch.nn.Linear(2, 2))) == torch.device("cpu")
    assert walks["Sequential"] >= 1  # not pinned: diffusers' own search
    with unpinned(base), module_walks() as walks:
        assert lookup(base.text_encoder_2) == torch.device("cpu")
    assert walks["CLIPTextModelWithProjection"] >= 1


def test_pinning_changes_no_image(tiny_engine: Engine) -> None:
    request = GenerationRequest(
        prompt="a red bicycle", width=64, height=64, num_inference_steps=4, seed=11, refine_mode="none"
    )
    pinned_image = np.asarray(tiny_engine.generate(request).images[0])
    with unpinned(tiny_engine.models.base):
        searched_image = np.asarray(tiny_engine.generate(request).images[0])
    assert np.array_equal(pinned_image, searched_image)


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloaded_pipelines_are_not_pinned(tiny_engine: Engine, offload: str) -> None:
    """Offload hooks move the models between uses: their search is the only right answer there."""
    base = tiny_engine.models.base
    with unpinned(base):
        assert pin_pipelines([base], SimpleNamespace(offload=offload, device="cuda")) == 0
        assert not is_pinned(base)
