"""Prompt embeddings: exactly what each pipeline's encode_prompt computes, each text encoded once, the
refiner's taken from the base's (the same bigG module), and a repeated prompt skipping the text encoders."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.prompt_cache import PromptEmbeddingCache
from imagesmith.schemas import GenerationRequest

SMALL = {"width": 64, "height": 64, "num_inference_steps": 10, "seed": 8}
CASES = [
    (["a lighthouse"], None, 7.5),  # the base: zeros for the empty negative (SDXL's training); refiner: ""
    (["a lighthouse"], ["blurry, text"], 7.5),
    (["a lighthouse"], None, 1.0),  # no classifier-free guidance at all
    (["a lighthouse", "a red bicycle"], ["blurry", "dark"], 5.0),  # a batch of rows
]


def _assert_same_as_encode_prompt(
    pipe: Any,
    args: dict[str, torch.Tensor | None],
    prompts: list[str],
    negatives: list[str] | None,
    guidance: float,
) -> None:
    """Row by row: a batch's rows are encoded one at a time (so a batched image is the one it would be alone;
    a batch-2 matmul may round differently from two batch-1 ones)."""
    names = [
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ]
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = pipe.encode_prompt(
                prompt=prompt,
                device=pipe._execution_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guidance > 1.0,
                negative_prompt=negatives[row] if negatives else None,
            )
        for name, want in zip(names, expected, strict=True):
            got = args[name]
            assert (got is None) == (want is None), name
            if want is not None:
                assert got is not None and torch.equal(got[row : row + 1], want), (name, row)


def test_a_prompt_past_the_encoders_length_is_cut_as_encode_prompt_cuts_it_and_said_so(
    tiny_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    base = tiny_engine.models.base
    long_prompt = ", ".join(f"detail {i}" for i in range(60))  # well past 77 tokens
    cache = PromptEmbeddingCache.for_one_pass()
    with caplog.at_level("WARNING", logger="imagesmith.engine.prompt_cache"):
        args = cache.pipeline_args(base, "base", [long_prompt], None, 1.0)
    _assert_same_as_encode_prompt(base, args, [long_prompt], None, 1.0)
    assert "longer than the text encoder's" in caplog.text
    caplog.clear()
    cache.pipeline_args(base, "base", ["a lighthouse"], None, 1.0)
    assert "longer than" not in caplog.text


@pytest.mark.parametrize(("prompts", "negatives", "guidance"), CASES)
def test_the_embeddings_are_encode_prompts_own(
    tiny_engine: Engine, prompts: list[str], negatives: list[str] | None, guidance: float
) -> None:
    base, refiner = tiny_engine.models.base, tiny_engine.models.refiner
    cache = PromptEmbeddingCache.for_one_pass()
    base_args = cache.pipeline_args(base, "base", prompts, negatives, guidance)
    refiner_args = cache.pipeline_args(refiner, "refiner", prompts, negatives, guidance)
    _assert_same_as_encode_prompt(base, base_args, prompts, negatives, guidance)
    _assert_same_as_encode_prompt(refiner, refiner_args, prompts, negatives, guidance)
    assert cache.derived == len(prompts) + len(negatives or [])  # bigG did not run again for the refiner


def test_a_refiner_with_its_own_text_encoder_encodes_for_itself(tiny_engine: Engine) -> None:
    base = tiny_engine.models.base
    refiner = copy.copy(tiny_engine.models.refiner)  # a shallow copy: the same modules but text_encoder_2
    refiner.text_encoder_2 = copy.deepcopy(base.text_encoder_2)
    with torch.no_grad():
        refiner.text_encoder_2.text_model.final_layer_norm.bias.add_(0.5)  # a different module, other outputs
    cache = PromptEmbeddingCache.for_one_pass()
    cache.pipeline_args(base, "base", ["a lighthouse"], None, 7.5)
    args = cache.pipeline_args(refiner, "refiner", ["a lighthouse"], None, 7.5)
    assert cache.derived == 0
    _assert_same_as_encode_prompt(refiner, args, ["a lighthouse"], None, 7.5)


def test_a_refiner_whose_tokenizer_pads_differently_encodes_for_itself(tiny_engine: Engine) -> None:
    base = tiny_engine.models.base
    refiner = copy.copy(tiny_engine.models.refiner)  # the same bigG module, another tokenizer
    refiner.tokenizer_2 = copy.deepcopy(base.tokenizer_2)
    # SDXL's bigG tokenizer pads with "!"; CLIP-L's with its end token. Pad with the other one.
    tokenizer = base.tokenizer_2
    refiner.tokenizer_2.pad_token = tokenizer.eos_token if tokenizer.pad_token == "!" else "!"
    cache = PromptEmbeddingCache.for_one_pass()
    cache.pipeline_args(base, "base", ["a lighthouse"], None, 7.5)
    args = cache.pipeline_args(refiner, "refiner", ["a lighthouse"], None, 7.5)
    assert cache.derived == 0
    _assert_same_as_encode_prompt(refiner, args, ["a lighthouse"], None, 7.5)


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "a lighthouse"},
        {"prompt": "a lighthouse", "negative_prompt": "blurry, text"},
        {"prompt": "a lighthouse", "guidance_scale": 1.0},
        {"prompt": "a lighthouse", "refine_mode": "img2img"},
    ],
)
def test_the_image_is_the_one_diffusers_gives_encoding_the_text_itself(
    tiny_settings: Settings, fields: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    request = GenerationRequest(**{**SMALL, **fields})  # type: ignore[arg-type]
    ours = np.asarray(
        Engine.start(tiny_settings.with_changes(prompt_cache_size=8)).generate(request).images[0]
    )
    off = np.asarray(
        Engine.start(tiny_settings.with_changes(prompt_cache_size=0)).generate(request).images[0]
    )

    def strings(
        self: object, pipe: object, role: str, prompts: list[str], negatives: Any, guidance: float
    ) -> Any:
        return {"prompt": prompts, "negative_prompt": negatives}  # the pipeline encodes them itself

    monkeypatch.setattr(PromptEmbeddingCache, "pipeline_args", strings)
    theirs = np.asarray(
        Engine.start(tiny_settings.with_changes(prompt_cache_size=0)).generate(request).images[0]
    )
    assert np.array_equal(ours, theirs) and np.array_equal(off, theirs)


def test_a_repeated_prompt_skips_the_text_encoders(tiny_settings: Settings) -> None:
    engine = Engine.start(tiny_settings.with_changes(prompt_cache_size=8))
    calls = {"text_encoder": 0, "text_encoder_2": 0}  # text_encoder_2 is the refiner's too
    for name in calls:
        module = getattr(engine.models.base, name)
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    request = GenerationRequest(prompt="a lighthouse", negative_prompt="blurry", **SMALL)  # type: ignore[arg-type]
    engine.generate(request)
    # Prompt and negative once each through CLIP-L and bigG, for the base; the refiner took bigG's from them.
    assert calls == {"text_encoder": 2, "text_encoder_2": 2}
    engine.generate(request.model_copy(update={"seed": 99}))
    assert calls == {"text_encoder": 2, "text_encoder_2": 2}  # all from the cache
    cache = engine.prompt_cache
    assert cache is not None and (cache.misses, cache.derived, cache.hits) == (2, 2, 4)


def test_with_the_cache_off_a_pass_still_encodes_each_text_once(tiny_settings: Settings) -> None:
    engine = Engine.start(tiny_settings.with_changes(prompt_cache_size=0))
    assert engine.prompt_cache is None
    calls = {"text_encoder_2": 0}
    engine.models.base.text_encoder_2.register_forward_hook(
        lambda *_: calls.__setitem__("text_encoder_2", calls["text_encoder_2"] + 1)
    )
    engine.generate(GenerationRequest(prompt="a lighthouse", **SMALL))  # type: ignore[arg-type]
    # The base's prompt, then the refiner's "" negative (its config does not use zeros): 2, where diffusers
    # alone runs bigG 3 times (base prompt, refiner prompt, refiner "").
    assert calls["text_encoder_2"] == 2
    engine.generate(GenerationRequest(prompt="a lighthouse", **SMALL))  # type: ignore[arg-type]
    assert calls["text_encoder_2"] == 4  # nothing kept across requests


def test_the_cache_keeps_at_most_max_entries(tiny_engine: Engine) -> None:
    cache = PromptEmbeddingCache(max_entries=2)
    base = tiny_engine.models.base
    for prompt in ("one", "two", "three"):
        cache.pipeline_args(base, "base", [prompt], None, guidance_scale=7.5)
    cache.pipeline_args(base, "base", ["three"], None, guidance_scale=7.5)
    assert len(cache._entries) == 2 and cache.hits == 1 and cache.misses == 3


def test_kept_embeddings_hold_no_autograd_graph(tiny_engine: Engine) -> None:
    """The text encoders' weights require grad; a kept tensor with a grad_fn would hold the encoder's
    activations (~124 MiB per SDXL prompt in bf16, ~8 GiB for a full default cache)."""
    cache = PromptEmbeddingCache()
    cache.pipeline_args(tiny_engine.models.base, "base", ["a lighthouse"], ["blurry"], 7.5)
    parts = list(cache._entries.values())
    assert parts and not any(part.hidden.requires_grad or part.pooled.requires_grad for part in parts)
