"""Cached prompt embeddings give the images the pipeline gives when it encodes the prompt itself, and a
repeated prompt does not run the text encoders again."""

from __future__ import annotations

import numpy as np
import pytest

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.prompt_cache import PromptEmbeddingCache
from imagesmith.schemas import GenerationRequest

SMALL = {"width": 64, "height": 64, "num_inference_steps": 10, "seed": 8}


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "a lighthouse"},  # zeros for the empty negative prompt (SDXL's training)
        {"prompt": "a lighthouse", "negative_prompt": "blurry, text"},
        {"prompt": "a lighthouse", "guidance_scale": 1.0},  # no classifier-free guidance at all
        {"prompt": "a lighthouse", "refine_mode": "img2img"},
    ],
)
def test_cached_embeddings_give_the_same_image(tiny_settings: Settings, fields: dict[str, object]) -> None:
    uncached = Engine.start(tiny_settings.with_changes(prompt_cache_size=0))
    cached = Engine.start(tiny_settings.with_changes(prompt_cache_size=8))
    assert uncached.prompt_cache is None and cached.prompt_cache is not None
    request = GenerationRequest(**{**SMALL, **fields})  # type: ignore[arg-type]
    a = np.asarray(uncached.generate(request).images[0])
    b = np.asarray(cached.generate(request).images[0])
    assert np.array_equal(a, b)


def test_a_repeated_prompt_skips_the_text_encoders(tiny_settings: Settings) -> None:
    engine = Engine.start(tiny_settings.with_changes(prompt_cache_size=8))
    calls = {"text_encoder": 0, "text_encoder_2": 0}
    for name in calls:
        module = getattr(engine.models.base, name)
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    request = GenerationRequest(prompt="a lighthouse", negative_prompt="blurry", **SMALL)  # type: ignore[arg-type]
    engine.generate(request)
    first = dict(calls)
    assert first["text_encoder"] > 0 and first["text_encoder_2"] > 0
    engine.generate(request.model_copy(update={"seed": 99}))
    assert calls == first  # base and refiner embeddings all came from the cache
    cache = engine.prompt_cache
    assert cache is not None and cache.hits == 2 and cache.misses == 2  # (base, refiner) x (miss, then hit)


def test_the_cache_keeps_at_most_max_entries(tiny_engine: Engine) -> None:
    cache = PromptEmbeddingCache(max_entries=2)
    base = tiny_engine.models.base
    for prompt in ("one", "two", "three"):
        cache.pipeline_args(base, "base", [prompt], None, guidance_scale=7.5)
    cache.pipeline_args(base, "base", ["three"], None, guidance_scale=7.5)
    assert len(cache._entries) == 2 and cache.hits == 1 and cache.misses == 3
