"""The worker batches compatible queued generation jobs into one pipeline pass; each job keeps its own result,
progress, cancel and image (the one it would have got alone). Real SQLite store, real files, tiny engine."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.jobs.events import EventHub
from imagesmith.jobs.metrics import Metrics
from imagesmith.jobs.store import JobStatus, JobStore
from imagesmith.jobs.worker import Worker
from imagesmith.schemas import GenerationRequest
from imagesmith.sources.base import ImageRequest, SourceName
from imagesmith.sources.generate import GenerateSource
from imagesmith.sources.registry import SourceRegistry
from imagesmith.storage.files import ImageFiles


def job_request(**generation: Any) -> dict[str, Any]:
    fields = {"width": 64, "height": 64, "num_inference_steps": 10, **generation}
    request = ImageRequest(sources=[SourceName.GENERATE], generation=GenerationRequest(**fields))
    return request.model_dump(mode="json")


@pytest.fixture
def service(tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path) -> Any:
    settings = tiny_settings.with_changes(data_dir=tmp_path, batch_max_images=4, batch_window_ms=0)
    store = JobStore(tmp_path / "jobs.sqlite3")
    generate = GenerateSource(settings, factory=lambda _: tiny_engine)
    generate.start_loading().join()
    files = ImageFiles(tmp_path / "images")
    worker = Worker(settings, store, files, SourceRegistry([generate]), EventHub(), Metrics(store.counts))
    yield store, worker, files
    worker.stop()
    store.close()


def submit(store: JobStore, request: dict[str, Any]) -> str:
    job, _ = store.submit(request, hashlib.sha256(repr(request).encode()).hexdigest(), None, queue_max=100)
    return job.id


def wait_all(store: JobStore, ids: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [store.get(job_id) for job_id in ids]
        if all(job is not None and job.status.terminal for job in jobs):
            return
        time.sleep(0.05)
    raise AssertionError("jobs did not finish")


def image_of(files: ImageFiles, result: dict[str, Any], index: int = 0) -> np.ndarray:
    item = result["images"][index]
    extension = item["url"].rsplit(".", 1)[1]
    with Image.open(files.path_for(item["sha256"], extension)) as image:
        return np.asarray(image).astype(np.int16)


def test_compatible_jobs_run_as_one_batch_each_image_as_if_alone(service: Any, tiny_engine: Engine) -> None:
    store, worker, files = service
    first = submit(store, job_request(prompt="a red bicycle", seed=1, num_images=2))
    other_size = submit(store, job_request(prompt="a boat", seed=2, width=96))  # incompatible: own pass
    second = submit(store, job_request(prompt="a blue boat", seed=3))
    too_many = submit(store, job_request(prompt="a kite", seed=4, num_images=2))  # 2+1+2 > 4 images
    worker.start()
    wait_all(store, [first, other_size, second, too_many])
    jobs = {job_id: store.get(job_id) for job_id in (first, other_size, second, too_many)}
    assert all(job is not None and job.status is JobStatus.SUCCEEDED for job in jobs.values())
    batch_sizes = {job_id: job.result["metadata"]["batch_size"] for job_id, job in jobs.items() if job}
    assert batch_sizes == {first: 3, second: 3, other_size: 1, too_many: 2}
    # Every batched image equals the one its request makes alone (rounding of batched products aside).
    solo = tiny_engine.generate(
        GenerationRequest(prompt="a blue boat", seed=3, width=64, height=64, num_inference_steps=10)
    )
    assert (
        np.abs(image_of(files, jobs[second].result) - np.asarray(solo.images[0]).astype(np.int16)).max() <= 2
    )
    assert jobs[first].result["metadata"]["seeds"] == [1, 2]


def test_a_canceled_job_in_a_batch_ends_canceled_and_the_others_succeed(service: Any) -> None:
    store, worker, _ = service
    keep = submit(store, job_request(prompt="keep", seed=1))
    drop = submit(store, job_request(prompt="drop", seed=2))

    def cancel_drop_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not worker.cancel(drop):
            time.sleep(0.005)

    worker.start()
    cancel_drop_when_running()
    wait_all(store, [keep, drop])
    assert store.get(keep).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
    assert store.get(drop).status is JobStatus.CANCELED  # type: ignore[union-attr]


def test_a_cancel_between_claim_and_start_is_not_lost(service: Any) -> None:
    """The store marks a job running when the worker claims it; a cancel that arrives before the worker has
    registered the job's cancel token is only in the store. The worker must still end the job canceled."""
    store, worker, _ = service
    job_id = submit(store, job_request(prompt="changed my mind", seed=3))
    (claimed,) = store.claim(1)
    assert claimed.id == job_id and not claimed.cancel_requested
    store.request_cancel(job_id)  # what JobService.cancel does for a running job
    assert not worker.cancel(job_id)  # no token yet: the worker has not begun it
    worker.run_batch([claimed])
    final = store.get(job_id)
    assert final is not None and final.status is JobStatus.CANCELED


def test_a_job_canceled_inside_a_batch_ends_at_once_not_when_the_pass_ends(service: Any) -> None:
    """Alone, a cancel stops the pass within a step; in a batch the pass goes on for the others, so the
    canceled job must not stay 'running' (and its waiters waiting) until the whole batch is done."""
    store, worker, _ = service
    keep = submit(store, job_request(prompt="keep", seed=1, num_inference_steps=40))
    drop = submit(store, job_request(prompt="drop", seed=2, num_inference_steps=40))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not worker.cancel(drop):
        time.sleep(0.005)
    ended = store.get(drop)
    assert ended is not None and ended.status is JobStatus.CANCELED  # when cancel returns, not later
    wait_all(store, [keep, drop])
    assert store.get(keep).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
    assert store.get(keep).result["metadata"]["batch_size"] == 2  # type: ignore[union-attr]
    assert store.get(drop).status is JobStatus.CANCELED  # type: ignore[union-attr]


def test_a_batch_pass_counts_its_stage_times_once(service: Any) -> None:
    """imagesmith_stage_seconds is per pipeline pass: three jobs sharing one pass add one observation per
    stage, not three (which would inflate the counts and sums under batching)."""
    store, worker, _ = service
    ids = [submit(store, job_request(prompt=f"job {n}", seed=n)) for n in range(3)]
    worker.start()
    wait_all(store, ids)
    assert {store.get(i).result["metadata"]["batch_size"] for i in ids} == {3}  # type: ignore[union-attr]
    counts = {
        sample.labels["stage"]: sample.value
        for family in worker.metrics.stage_seconds.collect()
        for sample in family.samples
        if sample.name.endswith("_count")
    }
    assert counts and set(counts.values()) == {1.0}, counts
