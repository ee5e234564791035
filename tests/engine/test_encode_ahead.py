"""Encode ahead (IMAGESMITH_ENCODE_AHEAD): the queued jobs' prompts are encoded between a pass's steps into the
prompt cache, the next pass finds them there, and its image is the one it would be without (bit for bit)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from text_embeddings import encode_prompt_alone

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.encode_ahead import EncodeAhead
from imagesmith.engine.engine import encode_ahead_refused
from imagesmith.jobs.queue_timing import generation_worker
from imagesmith.jobs.store import JobStatus, JobStore
from imagesmith.schemas import GenerationRequest
from imagesmith.sources.base import ImageRequest, SourceName

SMALL = {"width": 64, "height": 64, "num_inference_steps": 10, "seed": 8}


def count_text_encoder_calls(engine: Engine) -> dict[str, int]:
    calls = {"text_encoder": 0, "text_encoder_2": 0}
    base = engine.models.base
    for name in calls:
        getattr(base, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    return calls


def test_expected_prompts_are_encoded_during_a_pass_and_the_next_pass_skips_the_encoders(
    tiny_settings: Settings,
) -> None:
    engine = Engine.start(tiny_settings.with_changes(encode_ahead=True))
    assert engine.encode_ahead is not None
    assert any(lever.startswith("encode ahead") for lever in engine.levers)
    engine.encode_ahead.expect(["a red bicycle", "blurry", "", "a red bicycle"])  # "" and repeats dropped
    assert engine.encode_ahead.expected() == ["a red bicycle", "blurry"]
    engine.generate(GenerationRequest(prompt="a lighthouse", **SMALL))  # type: ignore[arg-type]
    assert engine.encode_ahead.encoded == 2 and engine.encode_ahead.expected() == []
    calls = count_text_encoder_calls(engine)
    engine.generate(
        GenerationRequest(prompt="a red bicycle", negative_prompt="blurry", **SMALL)  # type: ignore[arg-type]
    )
    # The base's prompt and negative from the cache; the refiner's sliced from them: no encoder ran.
    assert calls == {"text_encoder": 0, "text_encoder_2": 0}
    # What was kept is what encode_prompt gives for the text alone.
    cache, base = engine.prompt_cache, engine.models.base
    assert cache is not None
    hidden, pooled = encode_prompt_alone(base, "a red bicycle")
    kept = cache._entries[("base", "a red bicycle")]
    assert torch.equal(kept.hidden, hidden) and torch.equal(kept.pooled, pooled)


def test_an_image_is_the_same_whether_its_prompt_was_encoded_ahead_or_not(
    tiny_settings: Settings, tiny_engine: Engine
) -> None:
    ahead = Engine.start(tiny_settings.with_changes(encode_ahead=True))
    assert ahead.encode_ahead is not None
    ahead.encode_ahead.expect(["a red bicycle"])
    ahead.generate(GenerationRequest(prompt="a lighthouse", **SMALL))  # type: ignore[arg-type]
    assert ahead.encode_ahead.encoded == 1
    request = GenerationRequest(prompt="a red bicycle", **SMALL)  # type: ignore[arg-type]
    encoded_ahead = np.asarray(ahead.generate(request).images[0])
    assert np.array_equal(encoded_ahead, np.asarray(tiny_engine.generate(request).images[0]))


def test_at_most_one_text_a_step_when_steps_are_shorter_than_encoding(tiny_settings: Settings) -> None:
    """The budget is half the last step's time: a text that takes longer than that still goes (one a step), the
    next waits for the next step. Here a slowed encoder makes every text outlast a step."""
    engine = Engine.start(tiny_settings.with_changes(encode_ahead=True))
    assert engine.encode_ahead is not None and engine.prompt_cache is not None
    slow_encode = engine.prompt_cache._encode

    def encode_slowly(pipe: Any, text: str) -> Any:
        time.sleep(0.5)
        return slow_encode(pipe, text)

    engine.prompt_cache._encode = encode_slowly  # type: ignore[method-assign]
    engine.encode_ahead.expect([f"prompt {i}" for i in range(30)])
    engine.generate(GenerationRequest(prompt="a lighthouse", refine_mode="none", **SMALL))  # type: ignore[arg-type]
    # 10 base steps: none after the first (no step time to go by yet), one after each of the other 9.
    assert engine.encode_ahead.encoded == 9
    assert len(engine.encode_ahead.expected()) == 21


def test_encode_ahead_needs_the_prompt_cache_and_resident_weights(
    tiny_settings: Settings, tiny_engine: Engine
) -> None:
    no_cache = Engine.start(tiny_settings.with_changes(encode_ahead=True, prompt_cache_size=0))
    assert no_cache.encode_ahead is None
    assert not any(lever.startswith("encode ahead") for lever in no_cache.levers)
    assert "prompt cache" in (encode_ahead_refused(no_cache) or "")
    offloaded = Engine(tiny_engine.models, dataclasses.replace(tiny_engine.plan, offload="model"))
    assert "offload=model" in (encode_ahead_refused(offloaded) or "")
    assert encode_ahead_refused(tiny_engine) is None
    assert tiny_engine.encode_ahead is not None  # on by default (measured: run 41)


def test_the_worker_tells_the_engine_the_queued_jobs_prompts(tiny_settings: Settings, tmp_path: Path) -> None:
    settings = tiny_settings.with_changes(data_dir=tmp_path, batch_max_images=1, encode_ahead=True)
    engine = Engine.start(settings)
    assert engine.encode_ahead is not None
    store = JobStore(tmp_path / "jobs.sqlite3")
    worker = generation_worker(engine, settings, store, tmp_path / "images")
    prompts = ["a lighthouse", "a red bicycle", "a blue boat"]
    ids = []
    for prompt in prompts:
        body = ImageRequest(
            sources=[SourceName.GENERATE],
            generation=GenerationRequest(prompt=prompt, negative_prompt="blurry", **SMALL),  # type: ignore[arg-type]
        ).model_dump(mode="json")
        ids.append(store.submit(body, hashlib.sha256(repr(body).encode()).hexdigest(), None, 100)[0].id)
    calls = count_text_encoder_calls(engine)
    try:
        worker.start()
        deadline = time.monotonic() + 120
        while not all(store.get(i).status.terminal for i in ids):  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "jobs did not finish"
            time.sleep(0.05)
        assert {store.get(i).status for i in ids} == {JobStatus.SUCCEEDED}  # type: ignore[union-attr]
    finally:
        worker.stop()
        store.close()
    # The first job's pass encoded the second's prompt, the second's the third's ("blurry" once, with the first).
    assert engine.encode_ahead.encoded == 2
    # Each text ran the encoders once: 3 prompts and "blurry" (the refiner's parts are sliced from the base's).
    assert calls == {"text_encoder": 4, "text_encoder_2": 4}


def test_expect_replaces_what_was_expected() -> None:
    ahead = EncodeAhead(cache=None)  # type: ignore[arg-type]  # expect() does not touch the cache
    ahead.expect(["one", "two"])
    ahead.expect(["three"])
    assert ahead.expected() == ["three"]
