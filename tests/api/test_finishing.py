"""A pass's files are encoded and its jobs ended on the finishing thread while the next pass runs, and nothing is
lost on the way: not at a stop, not when an encoder fails. Real SQLite store, real worker, tiny engine; one
image's encoding is held at a gate so the test decides when it ends."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from polling import wait_for
from service_helpers import submit_generation

from imagesmith.config import Settings
from imagesmith.engine import Engine, output
from imagesmith.engine.output import read_parameters
from imagesmith.jobs.events import EventHub
from imagesmith.jobs.finishing import Finisher, encode_pending
from imagesmith.jobs.metrics import Metrics
from imagesmith.jobs.store import JobRecord, JobStatus, JobStore
from imagesmith.jobs.worker import Worker
from imagesmith.sources.base import SourceImage
from imagesmith.sources.generate import GenerateSource
from imagesmith.sources.registry import SourceRegistry
from imagesmith.storage.files import ImageFiles


class Gate:
    """Holds the encoding of images whose prompt starts with `prompt` until open() (or fails it, `fail`)."""

    def __init__(self, prompt: str, fail: bool = False) -> None:
        self.prompt, self.fail = prompt, fail
        self.entered, self._open = threading.Event(), threading.Event()

    def open(self) -> None:
        self._open.set()

    def encode(self, image: Image.Image, output_format: Any, parameters: str) -> bytes:
        if parameters.startswith(self.prompt):
            self.entered.set()
            if self.fail:
                raise OSError("disk full while encoding")
            assert self._open.wait(60), "the test never opened the gate"
        return REAL_ENCODE(image, output_format, parameters)


REAL_ENCODE = output.encode_image


class Service:
    def __init__(self, settings: Settings, engine: Engine, data: Path) -> None:
        self.store = JobStore(data / "jobs.sqlite3")
        generate = GenerateSource(settings, factory=lambda _: engine)
        generate.start_loading().join()
        self.files = ImageFiles(data / "images")
        self.worker = Worker(
            settings,
            self.store,
            self.files,
            SourceRegistry([generate]),
            EventHub(),
            Metrics(self.store.counts),
        )

    def submit(self, prompt: str, seed: int, images: int = 1) -> str:
        return submit_generation(
            self.store,
            prompt=prompt,
            seed=seed,
            width=64,
            height=64,
            num_inference_steps=4,
            num_images=images,
        )

    def job(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        assert job is not None
        return job

    def wait_terminal(self, *ids: str) -> None:
        wait_for(lambda: all(self.job(job_id).status.terminal for job_id in ids), timeout=60)

    def start_behind_a_gate(self, monkeypatch: pytest.MonkeyPatch) -> tuple[Gate, str, str]:
        """Two jobs, the first one's encoding held at a gate; returns once the worker has reached it."""
        gate = Gate("slow to encode")
        monkeypatch.setattr("imagesmith.engine.engine.encode_image", gate.encode)
        first = self.submit("slow to encode", seed=1)
        second = self.submit("next in line", seed=2)
        self.worker.start()
        assert gate.entered.wait(60)
        return gate, first, second

    def file_parameters(self, job_id: str) -> str | None:
        item = self.job(job_id).result["images"][0]  # type: ignore[index]
        return read_parameters(self.files.path_for(item["sha256"], "png"))


@contextlib.contextmanager
def make_service(
    tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path, background: bool, **changes: Any
) -> Iterator[Service]:
    """One image a pass and no batch window unless `changes` say otherwise; stopped and closed afterwards."""
    settings = tiny_settings.with_changes(
        **{"batch_max_images": 1, "batch_window_ms": 0, **changes},
        data_dir=tmp_path,
        finish_in_background=background,
    )
    service = Service(settings, tiny_engine, tmp_path)
    try:
        yield service
    finally:
        service.worker.stop()
        service.store.close()


@pytest.fixture
def background(tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path) -> Iterator[Service]:
    with make_service(tiny_settings, tiny_engine, tmp_path, background=True) as service:
        yield service


@pytest.fixture
def inline(tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path) -> Iterator[Service]:
    with make_service(tiny_settings, tiny_engine, tmp_path, background=False) as service:
        yield service


def test_the_next_pass_runs_while_the_last_one_is_encoded(
    background: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, first, second = background.start_behind_a_gate(monkeypatch)
    # The second job's whole pass runs while the first job's file is still being made...
    wait_for(lambda: (live := background.worker.live.get(second)) and live.overall_step == live.overall_total)
    # ...and the first job is still "running" in the store (a crash now leaves it to recovery, not lost), but no
    # longer on the GPU: a cancel cannot undo what its pass made, and says so.
    assert background.job(first).status is JobStatus.RUNNING
    assert first not in background.worker.on_gpu() and not background.worker.cancel(first)
    gate.open()
    background.wait_terminal(first, second)
    assert background.job(first).status is background.job(second).status is JobStatus.SUCCEEDED
    first_job, second_job = background.job(first), background.job(second)
    assert second_job.started_at is not None and first_job.finished_at is not None
    assert second_job.started_at < first_job.finished_at
    # Each job stored its own image: the files carry their own prompts and seeds.
    assert (background.file_parameters(first) or "").startswith("slow to encode")
    assert (background.file_parameters(second) or "").startswith("next in line")
    assert "Seed: 2" in (background.file_parameters(second) or "")


@pytest.mark.parametrize("claim_first", [True, False])
def test_the_next_jobs_are_claimed_before_the_last_pass_is_handed_over(
    background: Service, monkeypatch: pytest.MonkeyPatch, claim_first: bool
) -> None:
    """A claim made while the finishing thread stores PNGs waited for the GIL (5-20 ms against ~1 ms, runs 81-82),
    with the GPU idle: the worker claims the next pass first, then hands the last one over. The setting off gives
    the order before (the benchmark's A/B peer)."""
    background.worker.settings = background.worker.settings.with_changes(claim_before_hand_over=claim_first)
    events: list[tuple[str, list[str]]] = []
    real_claim, real_submit = background.store.claim, background.worker.finisher.submit

    def claim(limit: int = 1) -> list[JobRecord]:
        jobs = real_claim(limit)
        events.append(("claim", [job.id for job in jobs]))
        return jobs

    def submit(work: Any) -> None:
        events.append(("hand over", [item.job.id for item in work.args[0]]))
        real_submit(work)

    monkeypatch.setattr(background.store, "claim", claim)
    monkeypatch.setattr(background.worker.finisher, "submit", submit)
    first = background.submit("first", seed=1)
    second = background.submit("second", seed=2)
    background.worker.start()
    background.wait_terminal(first, second)
    if claim_first:
        expected = [("claim", [first]), ("claim", [second]), ("hand over", [first]), ("claim", [])]
        expected.append(("hand over", [second]))
    else:
        expected = [("claim", [first]), ("hand over", [first]), ("claim", [second]), ("hand over", [second])]
        expected.append(("claim", []))
    assert events[:5] == expected
    assert background.job(first).status is background.job(second).status is JobStatus.SUCCEEDED


def test_a_pass_held_back_ends_before_the_next_one_when_the_finisher_has_closed(
    background: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop that timed out closes the finishing thread while the worker is still alive; the worker then ends its
    passes inline. A pass it still held back must end first, not after the one that came later."""
    from imagesmith.jobs.worker import EndedJob

    worker = background.worker
    ended: list[str] = []
    real_finish = worker._finish_pass

    def finish(passes: list[EndedJob]) -> None:
        ended.extend(item.job.id for item in passes)
        real_finish(passes)

    monkeypatch.setattr(worker, "_finish_pass", finish)
    first, second = background.submit("first", seed=1), background.submit("second", seed=2)
    jobs = background.store.claim(2)
    worker._thread = threading.current_thread()  # these hand-overs are the loop's
    worker.finisher.start()
    try:
        worker._hand_over([EndedJob(jobs[0], time.perf_counter(), RuntimeError("first pass failed"))])
        assert ended == []  # held back until the next claim
        assert worker.finisher.close(10)
        worker._hand_over([EndedJob(jobs[1], time.perf_counter(), RuntimeError("second pass failed"))])
    finally:
        worker._thread = None
    assert ended == [first, second]
    assert background.job(first).status is background.job(second).status is JobStatus.FAILED


def test_a_claim_waiting_for_company_hands_the_last_pass_over_before_it_waits(
    tiny_settings: Settings, tiny_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next job is young, so its claim waits batch_window_ms for company: the pass before it is handed over
    (stored, its job ended) before that wait, not after it."""
    window_s = 5.0
    generated, go_on = threading.Event(), threading.Event()
    real_fetch = GenerateSource.fetch

    def held_fetch(self: GenerateSource, *args: Any, **kwargs: Any) -> Any:
        # Held after the pass has run, not before: on a loaded CPU the pass itself can outlast the window.
        outcome = real_fetch(self, *args, **kwargs)
        generated.set()
        assert go_on.wait(60), "the test never let the pass end"
        return outcome

    monkeypatch.setattr(GenerateSource, "fetch", held_fetch)
    windowed = make_service(
        tiny_settings, tiny_engine, tmp_path, True, batch_max_images=2, batch_window_ms=int(window_s * 1000)
    )
    with windowed as service:
        full = service.submit("a full pass", seed=1, images=2)  # fills batch_max: it waits for no company
        service.worker.start()
        assert generated.wait(60)
        # Young when the full pass ends: its claim waits for company.
        young = service.submit("waits for company", seed=2)
        go_on.set()
        # Ended while the young job's claim waits out its 5 s window (handed over after the wait, it would not be).
        wait_for(lambda: service.job(full).status.terminal, timeout=window_s - 1)
        assert service.job(full).status is JobStatus.SUCCEEDED
        assert service.job(young).status is JobStatus.RUNNING and young not in service.worker.on_gpu()
        company = service.submit("company", seed=3)  # joins the young job's pass, which then runs at once
        service.wait_terminal(young, company)
        assert service.job(young).status is service.job(company).status is JobStatus.SUCCEEDED


def test_finishing_inline_makes_the_next_job_wait_for_the_encoding(
    inline: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The setting off is the old behaviour: the next job is claimed only after the last one has ended."""
    gate, first, second = inline.start_behind_a_gate(monkeypatch)
    assert inline.job(second).status is JobStatus.QUEUED
    gate.open()
    inline.wait_terminal(first, second)
    first_job, second_job = inline.job(first), inline.job(second)
    assert first_job.finished_at is not None and second_job.started_at is not None
    assert second_job.started_at >= first_job.finished_at


def test_a_stop_finishes_the_pass_being_encoded(background: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass that is done on the GPU is stored and its job ended before stop() returns: not requeued to run
    again, not left running. The job behind it is not lost either: done, or back in the queue."""
    gate, first, second = background.start_behind_a_gate(monkeypatch)
    stopping = threading.Thread(target=background.worker.stop)
    stopping.start()
    wait_for(lambda: background.worker._stopping)
    assert background.job(first).status is JobStatus.RUNNING
    gate.open()
    stopping.join(60)
    assert not stopping.is_alive() and not background.worker.alive
    job = background.job(first)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert (background.file_parameters(first) or "").startswith("slow to encode")
    assert background.job(second).status in {JobStatus.SUCCEEDED, JobStatus.QUEUED}


def test_an_image_that_cannot_be_encoded_fails_its_job_and_the_worker_goes_on(
    background: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate("cannot encode", fail=True)
    monkeypatch.setattr("imagesmith.engine.engine.encode_image", gate.encode)
    broken = background.submit("cannot encode", seed=1)
    after = background.submit("after the broken one", seed=2)
    background.worker.start()
    background.wait_terminal(broken, after)
    failed = background.job(broken)
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None and failed.error["code"] == "generation_failed"
    assert "disk full while encoding" in failed.error["message"]
    assert background.job(after).status is JobStatus.SUCCEEDED


def test_a_pending_image_is_encoded_once_whoever_reads_it() -> None:
    calls: list[int] = []
    release = threading.Event()

    def encode() -> bytes:
        calls.append(1)
        release.wait(10)
        return b"file bytes"

    image = SourceImage(encode, "image/png", 8, 8)
    assert image.pending
    readers = [threading.Thread(target=lambda: image.data) for _ in range(3)]
    for reader in readers:
        reader.start()
    release.set()
    for reader in readers:
        reader.join(10)
    assert image.data == b"file bytes" and not image.pending and calls == [1]
    given = SourceImage(b"already a file", "image/jpeg", 1, 1)
    assert not given.pending and given.data == b"already a file"


def test_encode_pending_uses_the_encoding_threads_and_skips_made_files() -> None:
    threads: list[str] = []

    def encoder(index: int) -> Any:
        def encode() -> bytes:
            threads.append(threading.current_thread().name)
            buffer = io.BytesIO()
            Image.new("RGB", (4, 4), (index, 0, 0)).save(buffer, format="PNG")
            return buffer.getvalue()

        return encode

    images = [SourceImage(encoder(index), "image/png", 4, 4) for index in range(3)]
    made = SourceImage(b"made", "image/png", 4, 4)
    encode_pending([*images, made])
    assert not any(image.pending for image in images)
    assert len(threads) == 3 and all(name.startswith("imagesmith-encode") for name in threads)
    assert [Image.open(io.BytesIO(image.data)).getpixel((0, 0)) for image in images] == [
        (0, 0, 0),
        (1, 0, 0),
        (2, 0, 0),
    ]


def test_a_finisher_runs_work_in_order_on_its_thread_and_survives_a_failing_piece() -> None:
    finisher = Finisher()
    done: list[tuple[str, str]] = []

    def record(name: str) -> None:
        done.append((name, threading.current_thread().name))

    finisher.submit(lambda: record("before start"))
    assert done == [("before start", threading.current_thread().name)] and not finisher.running
    finisher.start()

    def broken() -> None:
        raise RuntimeError("boom")

    finisher.submit(lambda: record("a"))
    finisher.submit(broken)
    finisher.submit(lambda: record("b"))
    finisher.close()
    assert done[1:] == [("a", "imagesmith-finish"), ("b", "imagesmith-finish")]
    finisher.submit(lambda: record("after close"))
    assert done[-1] == ("after close", threading.current_thread().name)


def test_a_stop_that_outlasts_its_timeout_returns_and_says_so(
    background: Service, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server closes the store right after stop(): stop must return within its timeout even when storing a
    pass hangs, and log that those jobs run again at the next start."""
    gate, first, _ = background.start_behind_a_gate(monkeypatch)
    began = time.monotonic()
    background.worker.stop(timeout=1.0)
    assert time.monotonic() - began < 5
    assert "outlasted the stop" in caplog.text
    assert background.job(first).status is JobStatus.RUNNING  # left to recovery, not ended wrongly
    gate.open()  # the finishing thread then ends it after all, before the test closes the store
    wait_for(lambda: background.job(first).status is JobStatus.SUCCEEDED)


def test_work_submitted_while_a_finisher_closes_still_runs() -> None:
    """A submit that saw the thread running and a close that ran before its put: the work went in behind the end
    marker, and no thread ever ran it. Here the close starts between the two and gets a second to finish."""
    finisher = Finisher()
    finisher.start()
    ran: list[str] = []
    closed: list[bool] = []
    real_put = finisher._queue.put

    def put_after_a_close(item: Any, *args: Any, **kwargs: Any) -> None:
        if item is not None:
            closing = threading.Thread(target=lambda: closed.append(finisher.close(10)))
            closing.start()
            closing.join(1.0)  # the close runs (or waits its turn) before this put
        real_put(item, *args, **kwargs)

    finisher._queue.put = put_after_a_close  # type: ignore[method-assign]
    finisher.submit(lambda: ran.append("submitted as the finisher closed"))
    wait_for(lambda: closed == [True], timeout=10)
    assert ran == ["submitted as the finisher closed"]
    finisher.submit(lambda: ran.append("after the close, inline"))
    assert ran[-1] == "after the close, inline"


def test_closing_a_finisher_reports_whether_it_finished() -> None:
    finisher = Finisher()
    finisher.start()
    release = threading.Event()
    finisher.submit(lambda: release.wait(10) and None)
    assert finisher.close(timeout=0.2) is False
    release.set()
    idle = Finisher()
    idle.start()
    assert idle.close(timeout=5) is True
