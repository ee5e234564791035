"""Several compatible requests in one pipeline pass: each image is the one its request would get alone."""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imagesmith.config import Settings
from imagesmith.engine import BatchItem, CancelToken, Engine, GenerationCanceled, ProgressEvent, batch_key
from imagesmith.schemas import GenerationRequest

SMALL = {"width": 64, "height": 64, "num_inference_steps": 10}


def pixels(image: object) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_batched_requests_match_their_solo_runs(tiny_engine: Engine) -> None:
    first = GenerationRequest(prompt="a red bicycle", seed=11, num_images=2, **SMALL)
    second = GenerationRequest(prompt="a blue boat on a lake", seed=99, **SMALL)
    events: dict[str, list[ProgressEvent]] = {"first": [], "second": []}
    outcomes = tiny_engine.generate_batch(
        [
            BatchItem(first, events["first"].append),
            BatchItem(second, events["second"].append),
        ]
    )
    batched_first, batched_second = outcomes
    assert not isinstance(batched_first, BaseException) and not isinstance(batched_second, BaseException)
    assert batched_first.metadata.seeds == [11, 12] and batched_second.metadata.seeds == [99]
    assert batched_first.metadata.batch_size == 3 and len(batched_second.images) == 1
    solo_first = tiny_engine.generate(first)
    solo_second = tiny_engine.generate(second)
    for batched, solo in ((batched_first, solo_first), (batched_second, solo_second)):
        for a, b in zip(batched.images, solo.images, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 2
    # Each member hears every step, with its own rows of the latents, and the decode's start and end.
    heard = [
        *(("base", step) for step in range(1, 9)),
        ("refine", 1),
        ("refine", 2),
        ("decode", 0),
        ("decode", 1),
    ]
    assert (
        [(e.stage, e.step) for e in events["first"]] == [(e.stage, e.step) for e in events["second"]] == heard
    )
    assert events["first"][0].latents.shape[0] == 2 and events["second"][0].latents.shape[0] == 1


def test_a_member_that_cancels_is_dropped_and_the_rest_finish(tiny_engine: Engine) -> None:
    token = CancelToken()

    def cancel_early(event: ProgressEvent) -> None:
        if event.step == 2:
            token.cancel()

    keep = GenerationRequest(prompt="keep me", seed=1, **SMALL)
    drop = GenerationRequest(prompt="drop me", seed=2, **SMALL)
    outcomes = tiny_engine.generate_batch([BatchItem(keep), BatchItem(drop, cancel_early, token)])
    assert not isinstance(outcomes[0], BaseException) and outcomes[0].images
    assert isinstance(outcomes[1], GenerationCanceled)
    # Its row went through the pass's steps, but is not decoded: the decode made only the kept image.
    stages = {stage.name: stage.steps for stage in outcomes[0].metadata.stages}
    assert stages["decode"] == 1 and outcomes[0].metadata.batch_size == 2
    solo = tiny_engine.generate(keep)
    assert np.abs(pixels(outcomes[0].images[0]) - pixels(solo.images[0])).max() <= 2


def test_incompatible_requests_are_refused() -> None:
    a = GenerationRequest(prompt="x", **SMALL).resolve()
    b = GenerationRequest(prompt="x", scheduler="ddim", **SMALL).resolve()
    c = GenerationRequest(prompt="y", negative_prompt="blur", **SMALL).resolve()
    assert batch_key(a) != batch_key(b) and batch_key(a) != batch_key(c)
    assert batch_key(a) == batch_key(
        GenerationRequest(prompt="other", seed=5, num_images=3, **SMALL).resolve()
    )


def test_generate_batch_refuses_mixed_keys(tiny_engine: Engine) -> None:
    with pytest.raises(ValueError, match="batch_key"):
        tiny_engine.generate_batch(
            [
                BatchItem(GenerationRequest(prompt="x", **SMALL)),
                BatchItem(GenerationRequest(prompt="x", scheduler="ddim", **SMALL)),
            ]
        )


def test_a_batch_is_encoded_in_parallel_and_each_job_gets_its_own_files(
    tiny_engine: Engine, tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GenerateSource.fetch_batch leaves the files to be made (the worker makes them off the GPU's path);
    encode_pending makes every image of the pass on the encoding threads at once; each job's files are its own
    images, in order, past a member that was canceled."""
    from imagesmith.engine import output
    from imagesmith.jobs.finishing import encode_pending
    from imagesmith.sources.generate import GenerateSource

    threads: list[str] = []
    real_encode = output.encode_image

    def recording_encode(*args: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return real_encode(*args)

    monkeypatch.setattr("imagesmith.engine.engine.encode_image", recording_encode)
    source = GenerateSource(tiny_settings.with_changes(warmup=False), factory=lambda _: tiny_engine)
    source.start_loading().join()
    token = CancelToken()
    token.cancel()
    two = GenerationRequest(prompt="two of these", seed=5, num_images=2, **SMALL)
    canceled = GenerationRequest(prompt="never mind", seed=6, **SMALL)
    one = GenerationRequest(prompt="one of those", seed=7, **SMALL)
    outcomes = source.fetch_batch([BatchItem(two), BatchItem(canceled, None, token), BatchItem(one)])
    assert isinstance(outcomes[1], GenerationCanceled)
    assert not isinstance(outcomes[0], BaseException) and not isinstance(outcomes[2], BaseException)
    images = [image for outcome in (outcomes[0], outcomes[2]) for image in outcome.images]
    assert threads == [] and all(image.pending for image in images)
    encode_pending(images)
    assert len(threads) == 3 and all(name.startswith("imagesmith-encode") for name in threads)
    for outcome, request in ((outcomes[0], two), (outcomes[2], one)):
        solo = tiny_engine.generate(request)
        files = [Image.open(io.BytesIO(image.data)) for image in outcome.images]
        assert len(files) == len(solo.images)
        for stored, expected in zip(files, solo.images, strict=True):
            assert np.abs(pixels(stored.convert("RGB")) - pixels(expected)).max() <= 2
