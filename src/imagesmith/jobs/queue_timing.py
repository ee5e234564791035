"""Jobs through the service's own queue (SQLite job store -> worker -> engine -> finishing thread -> files) on an
engine that is already warm, timed from the first submit to the last job's end: `imagesmith bench --queue N`, and
the benchmarks' queue rows (benchmarks/fast_path.py --queue-jobs).

Why a warm engine: the images per second a service gets, beside the engine's own, without a second start.
`benchmarks/queue_throughput.py` starts the service as a user would (its warm-up compiles the one-image graph and
every batch size's CUDA graphs), and with the opt-in fp8 levers that start took ~10 minutes (run 46 in
docs/benchmarks.md), more than one device call; `imagesmith bench` has the engine warm at the batch it measures.

Each pass's own seconds and the worker's time between two passes are reported too (PassClock): what the engine
alone never pays, and so where a queue's rate falls short of the engine's beyond the passes themselves. Of that
time, the store's claim transactions (claim_ms: a pass's head, then its company, each committed with an fsync)
and one fsync's milliseconds on the row's store's disk (fsync_ms): run 81 found 20-29 ms between passes on the
GPU's host against 5-10 on this CPU, and whether the claims' commits explain it decides what to change.

Two rates: over the whole row (the first pass's encodes and the last pass's files included, what a burst of N
jobs sees) and in steady state, from the end of the first pass to the end of the last (what a stream that keeps
the queue full gets; with N = 2 passes the whole-row rate mixes both ends in).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from imagesmith.config import Settings
from imagesmith.engine.engine import Engine, encode_ahead_for
from imagesmith.engine.prompt_cache import PromptEmbeddingCache
from imagesmith.jobs.events import EventHub
from imagesmith.jobs.metrics import Metrics
from imagesmith.jobs.store import JobRecord, JobStatus, JobStore
from imagesmith.jobs.worker import Worker
from imagesmith.schemas import GenerationRequest
from imagesmith.sources.base import ImageRequest, SourceName
from imagesmith.sources.generate import GenerateSource
from imagesmith.sources.registry import SourceRegistry
from imagesmith.storage.files import ImageFiles


def fsync_ms(folder: Path, times: int = 20) -> float:
    """The median milliseconds of an fsync after a 4 KiB write in `folder`: what each durable commit of a job
    store there pays at least. Microseconds kept (tmpfs answers in one)."""
    probe = folder / "fsync-probe"
    seconds: list[float] = []
    try:
        with probe.open("wb") as file:
            for _ in range(times):
                file.write(b"\0" * 4096)
                file.flush()
                began = time.perf_counter()
                os.fsync(file.fileno())
                seconds.append(time.perf_counter() - began)
    finally:
        probe.unlink(missing_ok=True)
    return round(statistics.median(seconds) * 1000, 4)


def timed_claims(store: JobStore) -> list[tuple[float, float]]:
    """Each of the store's claim transactions that took jobs from now on, as (when it began, its milliseconds):
    the commits alone, not the worker's wait for company. An instance attribute over JobStore.claim_where (which
    claim() calls too), on this store only."""
    claims: list[tuple[float, float]] = []
    original = store.claim_where

    def timed(accept: Callable[[JobRecord], bool], limit: int, scan: int = 200) -> list[JobRecord]:
        began = time.perf_counter()
        jobs = original(accept, limit, scan)
        if jobs:
            claims.append((began, (time.perf_counter() - began) * 1000))
        return jobs

    store.claim_where = timed  # type: ignore[method-assign]
    return claims


def generation_worker(engine: Engine, settings: Settings, store: JobStore, images: Path) -> Worker:
    """The service's worker with generation as its one source, on an engine that is already loaded (and warm, if
    it is to be): how the queue rows, and tests, run jobs without starting a service."""
    source = GenerateSource(settings, factory=lambda _: engine)
    source.start_loading().join()
    return Worker(
        settings, store, ImageFiles(images), SourceRegistry([source]), EventHub(), Metrics(store.counts)
    )


class PassClock:
    """When each engine pass began and ended (perf_counter), read around the engine's generate_batch for as long
    as the clock is entered. The time from one pass's end to the next one's start is the worker's (handing the
    pass to the finishing thread, claiming the next jobs, their bookkeeping): the GPU has no pass queued then."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.spans: list[tuple[float, float]] = []
        self._hidden: Any = None

    def __enter__(self) -> PassClock:
        original = self.engine.generate_batch
        # Another wrapper already on this engine (a benchmark's, an outer clock) is put back on exit.
        self._hidden = vars(self.engine).get("generate_batch")

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spans.append((began, time.perf_counter()))

        # An instance attribute hides the method for this engine only; __exit__ uncovers it again.
        self.engine.generate_batch = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hidden is None:
            del self.engine.generate_batch
        else:
            self.engine.generate_batch = self._hidden  # type: ignore[method-assign]

    def row(self, since: float) -> dict[str, Any]:
        """The passes that began at or after `since`: each one's seconds, and the milliseconds between them."""
        spans = [span for span in self.spans if span[0] >= since]
        return {
            "pass_s": [round(end - began, 4) for began, end in spans],
            "between_passes_ms": [
                round((after[0] - before[1]) * 1000, 2) for before, after in itertools.pairwise(spans)
            ],
        }


def through_queue(
    engine: Engine,
    settings: Settings,
    bodies: list[dict[str, Any]],
    warm_bodies: list[dict[str, Any]],
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Run `warm_bodies` (untimed: one pass that warms the worker's own path) then `bodies` through a fresh
    store and worker on `engine`, in a temporary data folder; `settings` set batching. The engine is not warmed
    again: its warm-up is turned off here. It gets the service's prompt cache and encode ahead for the row, as
    the service's engine has them, and its own back after. Raises TimeoutError when the jobs have not ended
    within `timeout_s`, and RuntimeError when the worker thread has stopped, rather than wait for ever."""
    # The clock outlasts the worker: the worker is stopped (in the finally below) before the clock lets go.
    with tempfile.TemporaryDirectory() as folder, PassClock(engine) as clock:
        data = Path(folder)
        settings = settings.with_changes(data_dir=data, warmup=False)
        store = JobStore(data / "jobs.sqlite3")
        previous_cache, previous_encode_ahead = engine.prompt_cache, engine.encode_ahead
        worker: Worker | None = None
        queue_max = len(bodies) + len(warm_bodies)
        deadline = time.monotonic() + timeout_s

        def submit(body: dict[str, Any]) -> str:
            job, _ = store.submit(body, hashlib.sha256(repr(body).encode()).hexdigest(), None, queue_max)
            return job.id

        def submit_all(batch: list[dict[str, Any]]) -> list[str]:
            return [submit(body) for body in batch]

        def wait_for_all(worker: Worker) -> None:
            """Until every job in the row's store has ended. One count a poll, every 10 ms: reading each job
            every 5 ms (as this did) was 127,000 reads for a row of 64 jobs on the CPU, and held the GIL the
            worker and the GPU thread need, a load no service's clients put on it (they wait on events)."""
            while any(count for status, count in store.counts().items() if not status.terminal):
                if not worker.alive:
                    raise RuntimeError("the worker thread stopped before the queue row's jobs ended")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the queue row's jobs did not end within {timeout_s:.0f}s")
                time.sleep(0.01)

        try:
            if previous_cache is None and settings.prompt_cache_size:
                # The service's engine has its prompt cache (Engine.start); encode ahead fills it.
                engine.prompt_cache = PromptEmbeddingCache(settings.prompt_cache_size)
            # What Engine.start does with the setting.
            engine.encode_ahead = encode_ahead_for(engine, settings)
            worker = generation_worker(engine, settings, store, data / "images")
            claims = timed_claims(store)
            fsync = fsync_ms(data)
            submit_all(warm_bodies)
            worker.start()
            wait_for_all(worker)
            # The whole burst is queued before the worker looks, like jobs that came in while a pass ran: a claim
            # in the middle of the submissions would run a partial pass.
            worker.pause_claims()
            started_wall = time.time()
            started = time.perf_counter()
            ids = submit_all(bodies)
            worker.resume_claims()
            wait_for_all(worker)
            wall = time.perf_counter() - started
            jobs = [stored(store, job_id) for job_id in ids]
        finally:
            if worker is not None:
                worker.stop()
            engine.prompt_cache, engine.encode_ahead = previous_cache, previous_encode_ahead
            store.close()
    # Every job has ended (wait_for_all), so each has its finishing time.
    finished = sorted((job.finished_at or started_wall) - started_wall for job in jobs)
    # A failed job has no result: the row then says all_succeeded False rather than failing itself.
    sizes = [job.result["metadata"]["batch_size"] for job in jobs if job.result]
    row: dict[str, Any] = {
        "jobs": len(jobs),
        "all_succeeded": all(job.status == JobStatus.SUCCEEDED for job in jobs),
        "batch_sizes_seen": sorted(set(sizes)),
        "wall_s": round(wall, 4),
        "images_per_s": len(jobs) / wall,
        "finished_s": [round(seconds, 4) for seconds in finished],
    }
    row.update(steady_state(finished, max(sizes, default=1)))
    row["median_stage_s"] = stage_medians(job.result for job in jobs)
    row["base_s_by_pass"] = base_stage_by_pass(jobs)
    row.update(clock.row(since=started))
    # After the burst was queued: about two a pass (its head, then its company).
    row["claim_ms"] = [round(ms, 2) for began, ms in claims if began >= started]
    row["fsync_ms"] = fsync
    return row


def stored(store: JobStore, job_id: str) -> JobRecord:
    """The job as the store holds it; the row's own jobs are never deleted while it runs."""
    job = store.get(job_id)
    if job is None:
        raise LookupError(f"job {job_id} is gone from the store")
    return job


def steady_state(finished_s: list[float], batch: int) -> dict[str, Any]:
    """Images per second from the end of the first pass (its `batch` jobs, the first to end) to the end of the
    last; empty with fewer than two passes."""
    if len(finished_s) < 2 * batch:
        return {}
    span = finished_s[-1] - finished_s[batch - 1]
    return {"steady_images_per_s": (len(finished_s) - batch) / span, "steady_span_s": round(span, 4)}


def base_stage_by_pass(jobs: Iterable[JobRecord]) -> list[float]:
    """The base stage's seconds of each pass, in the order the passes ran: which passes paid for work between
    their steps (encode ahead runs in a pass's base stage when jobs wait behind it; the last pass has none)."""
    by_pass: dict[tuple[float, ...], float] = {}
    for job in sorted(jobs, key=lambda job: job.finished_at or 0.0):
        stages = (job.result or {}).get("metadata", {}).get("stages", [])
        base = [stage["seconds"] for stage in stages if stage["name"] == "base"]
        if base:
            # A pass's jobs share its stage timings: the tuple of them identifies the pass.
            by_pass.setdefault(tuple(stage["seconds"] for stage in stages), round(base[0], 4))
    return list(by_pass.values())


def stage_medians(results: Iterable[dict[str, Any] | None]) -> dict[str, float]:
    """Each stage's median seconds over the jobs (a batched pass's stages appear once for each of its jobs)."""
    times: dict[str, list[float]] = {}
    for result in results:
        for stage in (result or {}).get("metadata", {}).get("stages", []):
            times.setdefault(stage["name"], []).append(stage["seconds"])
    return {name: round(statistics.median(values), 4) for name, values in times.items()}


def request_bodies(make: Callable[[int], GenerationRequest], first: int, count: int) -> list[dict[str, Any]]:
    """`count` generate-only request bodies, the JSON the HTTP API takes, from `make(i)`'s GenerationRequest."""
    return [
        ImageRequest(sources=[SourceName.GENERATE], generation=make(i)).model_dump(mode="json")
        for i in range(first, first + count)
    ]
