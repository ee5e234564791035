"""The worker: one thread that owns the GPU, takes jobs FIFO from the store and runs them through the sources.

One generation runs at a time (the engine holds a lock too). The loop claims the oldest queued job; when it is a
generation-only job and batching is on, it claims more queued jobs with the same engine batch_key (same size,
steps, mode, scheduler, guidance), up to batch_max_images images, waiting for more while the oldest job is younger
than batch_window_ms (Worker._claim_company), and runs them as one pipeline pass. Each image stays what it would
have been alone (its own seeds and generators); each job keeps its own progress events, cancel and result. A
pass's files are encoded and its jobs ended on the finishing thread while the next pass runs (jobs/finishing.py;
setting finish_in_background).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import TypeAdapter

from imagesmith.config import Settings
from imagesmith.engine.engine import BatchItem, Engine
from imagesmith.engine.pipeline import BatchKey, batch_key
from imagesmith.engine.progress import CancelToken, GenerationCanceled
from imagesmith.jobs.events import EventHub
from imagesmith.jobs.finishing import Finisher, encode_pending
from imagesmith.jobs.metrics import Metrics
from imagesmith.jobs.progress_tracker import LiveProgress, ProgressTracker
from imagesmith.jobs.store import (
    CANCELED_WHILE_RUNNING,
    JobRecord,
    JobStatus,
    JobStore,
    store_busy,
    store_unwritable,
)
from imagesmith.logs import current_job
from imagesmith.sources.base import (
    FallbackReason,
    ImageRequest,
    SourceName,
    SourceResult,
    SourceState,
    SourceUnavailable,
)
from imagesmith.sources.fallback import Served, SourceAttempt, SourcesExhausted, serve_first
from imagesmith.sources.generate import GenerateSource
from imagesmith.sources.registry import SourceRegistry
from imagesmith.storage.files import ImageFiles

log = logging.getLogger(__name__)

# A job's end waiting on a busy store is written again after 0.5, 1, 2, 4, 8, 8, ... s.
FINISH_RETRY_FIRST_S = 0.5
FINISH_RETRY_MAX_S = 8.0


def generation_batch_key(job: JobRecord) -> BatchKey | None:
    """The engine batch key of a generation-only job; None for jobs that cannot share a pass (stock first)."""
    try:
        request = ImageRequest.model_validate(job.request)
    except ValueError:
        return None
    if request.sources != [SourceName.GENERATE]:
        return None
    return batch_key(request.generation.resolve())


def asks_stock_first(request: dict[str, Any]) -> bool:
    """Whether a stored request asks Pexels first: such a job waits on the network (seconds, up to the timeouts
    and retries), so it runs on the stock lane, never in the GPU's queue (Worker._stock_loop). Read from the
    stored JSON, not a validated ImageRequest: every claim tests each row it scans, and queue positions every
    queued row. A stored request was validated when it was submitted (`sources` is required there); one that no
    longer validates fails with its own error on whichever loop claims it."""
    sources = request.get("sources")
    return isinstance(sources, list) and sources[:1] == [SourceName.STOCK.value]


class EndedJob(NamedTuple):
    """A job whose pass is over, on its way to the finishing thread."""

    job: JobRecord
    started: float  # perf_counter when the job began, for its duration metric
    outcome: Served | BaseException
    explicit_cancel: bool = False  # a client asked to cancel it (not a shutdown); set at hand-over


def _images_of(job: JobRecord) -> int:
    generation = job.request.get("generation", {}) if isinstance(job.request, dict) else {}
    return int(generation.get("num_images", 1) or 1)


def served_directly(result: SourceResult) -> Served:
    """A generation result that was asked for first (batched jobs are generation-only)."""
    attempt = SourceAttempt(source=result.source, served=True, reason=FallbackReason.REQUESTED)
    return Served(result=result, attempts=[attempt])


_JSON_TIME = TypeAdapter(datetime)


def source_error(error: SourceUnavailable) -> dict[str, Any]:
    """The job's error when no source could serve: a code a client can act on, the reason, every attempt."""
    code = {
        FallbackReason.NO_RESULTS: "no_results",
        FallbackReason.QUOTA_EXHAUSTED: "quota_exhausted",
    }.get(error.reason, "source_unavailable")
    attempts = error.attempts if isinstance(error, SourcesExhausted) else []
    return {
        "code": code,
        "message": f"{error}"[:2000],
        "reason": error.reason.value,
        # Written as the attempts' (pydantic's JSON: "...Z"); isoformat() gave "+00:00" beside them.
        "retry_at": _JSON_TIME.dump_python(error.retry_at, mode="json") if error.retry_at else None,
        "attempts": [attempt.model_dump(mode="json") for attempt in attempts],
    }


# After a job's images could not be written (a full or failing disk), the worker claims nothing for this long:
# each retry runs the generation again and spends an attempt, so a disk that fills for a minute must not use up
# every queued job's attempts in seconds.
IMAGE_WRITE_PAUSE_S = 10.0


class ImageWriteFailed(Exception):
    """A job's images were made but could not be written to the data dir (its OSError is the cause)."""


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        files: ImageFiles,
        sources: SourceRegistry,
        hub: EventHub,
        metrics: Metrics,
    ) -> None:
        self.settings, self.store, self.files, self.sources, self.hub, self.metrics = (
            settings,
            store,
            files,
            sources,
            hub,
            metrics,
        )
        self.live: dict[str, LiveProgress] = {}
        self._wake = threading.Condition()
        self._stop_requested = threading.Event()  # set by stop(); also wakes a write waiting out a busy store
        self._tokens: dict[str, CancelToken] = {}
        self._batched: set[str] = set()  # jobs running in a pass with other jobs (under _tokens_lock)
        self._claims_paused = False
        self._tokens_lock = threading.Lock()
        self._explicit_cancels: set[str] = set()  # asked by a client, unlike a shutdown's cancel
        self._stranded: set[str] = set()  # running in the store, though their end could not be written
        self._claims_resume_at = 0.0  # time.monotonic(): no claim before it (after an image write failed)
        # (time.monotonic(), error) of the last image write that failed, for health
        self.image_write_failure: tuple[float, str] | None = None
        self._thread: threading.Thread | None = None
        # The stock lane (started with a Pexels source): jobs that ask Pexels first run there, so a slow or
        # failing Pexels (up to the timeouts x retries a request) never holds the GPU's queue. A stock job that
        # falls back to generation queues its pass on the engine's GPU thread like any other (engine.py).
        self._stock_thread: threading.Thread | None = None
        self.finisher = Finisher()  # inline until start(): a pass run by a direct run_batch call ends in it
        # The loop's last pass, ended but not yet handed to the finishing thread: the next claim runs first
        # (see _submit_finishing). Touched by the worker thread only.
        self._unsubmitted: functools.partial[None] | None = None

    # --- control, from any thread ---

    def start(self) -> None:
        if self.settings.finish_in_background:
            self.finisher.start()
        self._thread = threading.Thread(target=self._loop, name="imagesmith-worker", daemon=True)
        self._thread.start()
        if self.sources.get(SourceName.STOCK) is not None:
            self._stock_thread = threading.Thread(
                target=self._stock_loop, name="imagesmith-stock", daemon=True
            )
            self._stock_thread.start()

    @property
    def _stopping(self) -> bool:
        return self._stop_requested.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def pause_claims(self) -> None:
        """Take no new job (the server is stopping); the job running now goes on until stop(). A claim waiting
        for company stops waiting and runs what it holds."""
        self._claims_paused = True
        self.notify()

    def resume_claims(self) -> None:
        """Take jobs again after pause_claims (a benchmark that queues a whole burst before the worker sees it)."""
        self._claims_paused = False
        self.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step: a running job is canceled and put back in the queue, not lost. A pass
        already done is finished (its files stored, its jobs ended) before stop() returns, all within `timeout`."""
        self._stop_requested.set()
        with self._tokens_lock:
            for token in self._tokens.values():
                token.cancel()
        self.notify()
        deadline = time.monotonic() + timeout
        for thread in (self._thread, self._stock_thread):
            if thread is None:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error(
                    "the %s thread did not stop within %.0fs; its running job runs again at the next start",
                    thread.name,
                    timeout,
                )
        # After the worker's last hand-over: what its passes made is stored and ended before stop() returns (the
        # server closes the store next). A late hand-over from a worker still running finishes inline.
        if not self.finisher.close(max(0.0, deadline - time.monotonic())):
            log.error(
                "storing the last pass's images outlasted the stop; its jobs run again at the next start"
            )

    def cancel(self, job_id: str) -> bool:
        """Cancel a running job; False when this worker is not running it.

        Alone, the job stops within one step. In a batch the pass goes on for the other jobs (the engine
        drops this one's rows at the end), so the job is ended canceled now rather than when the pass ends."""
        with self._tokens_lock:
            token = self._tokens.get(job_id)
            if token is not None:
                self._explicit_cancels.add(job_id)
            in_batch = job_id in self._batched
        if token is None:
            return False
        token.cancel()
        job = self.store.get(job_id) if in_batch else None
        if job is not None:
            # Ends it only while running (finish() changes nothing once it ended); the batch's own finish of
            # this job later is then a no-op.
            try:
                self._finish(job, JobStatus.CANCELED, error=CANCELED_WHILE_RUNNING, patient=False)
            except sqlite3.OperationalError as error:
                # The cancel took effect (its token is tripped, the request is remembered): the pass ends the job
                # canceled when it ends. Not an error to the client, who would read "nothing was changed".
                log.warning("job %s ends canceled when its pass ends: the store is busy (%s)", job_id, error)
        return True

    # --- the loop, on the worker thread ---

    def _loop(self) -> None:
        try:
            # Left by a cancel that raced the last shutdown's requeue. While this worker runs, neither
            # requeue() nor JobService.cancel leaves such a row, so once, at start, is enough.
            self._end_canceled_queued()
        except Exception:
            log.exception("ending queued jobs flagged for cancel failed")
        try:
            while not self._stopping:
                self._release_stranded()
                jobs = self._claimed(self._claim, "jobs")
                self._submit_finishing()
                if not jobs:
                    with self._wake:
                        self._wake.wait(timeout=0.5)
                    continue
                self._expect_next_prompts()
                try:
                    self.run_batch(jobs)
                except Exception as error:  # keep the worker alive whatever happens to one batch
                    log.exception("worker batch failed")
                    self._end_unfinished(jobs, error)
        finally:
            self._submit_finishing()  # the last pass before a stop: stored before stop() returns

    def _stock_loop(self) -> None:
        """The stock lane: claims the oldest job that asks Pexels first and runs it (its fallback to generation
        included) while the GPU loop runs the rest of the queue. One stock job at a time, as before."""
        while not self._stopping:
            jobs = self._claimed(
                lambda: self.store.claim_where(self._stock_lane_takes, limit=1), "a stock job"
            )
            if not jobs:
                with self._wake:
                    self._wake.wait(timeout=0.5)
                continue
            try:
                self.run_batch(jobs)
            except Exception as error:
                log.exception("stock job failed")
                self._end_unfinished(jobs, error)

    def _claimed(self, claim: Callable[[], list[JobRecord]], what: str) -> list[JobRecord]:
        """`claim`'s jobs; none while claims wait (paused, backing off, the sources settling) or when it fails.
        A broken claim must not end its loop (the GPU loop's or the stock lane's): the jobs stay queued, and the
        loop tries again. A full or failing disk gets one line, not a traceback every round."""
        try:
            waiting = self._claims_paused or time.monotonic() < self._claims_resume_at
            return [] if waiting or self.sources.settling() else claim()
        except Exception as error:
            if store_unwritable(error):
                log.warning(
                    "claiming %s failed: the job store cannot be written (%s); trying again", what, error
                )
            else:
                log.exception("claiming %s failed", what)
            return []

    def line_of(self, request: dict[str, Any]) -> str:
        """The line a queued job (its stored request) waits in: "stock" (the stock lane, while it runs) or "gpu".
        For queue positions: a generation is not behind the stock jobs queued before it."""
        return "stock" if self._stock_thread is not None and asks_stock_first(request) else "gpu"

    def _stock_lane_takes(self, job: JobRecord) -> bool:
        """A job that asks Pexels first; while the models failed to load, only one another source can serve
        (the rest stay queued for the restart that fixes the models, as in the GPU loop's claim)."""
        if not asks_stock_first(job.request):
            return False
        models_failed = self.sources.status(SourceName.GENERATE).state is SourceState.FAILED
        return not models_failed or self._servable_without_models(job)

    def _gpu_loop_takes(self, job: JobRecord) -> bool:
        """What the GPU loop claims: everything but the stock lane's jobs (while the lane runs)."""
        return self._stock_thread is None or not asks_stock_first(job.request)

    def _submit_finishing(self) -> None:
        """Hand the last pass to the finishing thread, after the claim of the next one.

        Claimed while the finishing thread stores the last pass's PNGs, the next jobs' claim waited for the GIL:
        5-20 ms a claim against 0.5-1.5 ms with the thread idle, 13-27 ms of the 19-34 ms the GPU waited between
        two passes of 8 (runs 81-82, docs/benchmarks.md). So the loop claims first and hands over after, which
        delays a pass's results by one uncontended claim (~1 ms); a claim that waits for company (batch_window_ms)
        hands over before it waits, so the window never delays them. Measured (run 85, H100): each claim 0.5-1.5
        ms instead of up to 9; the time between passes fell less (17 -> 15 ms median), as the finishing thread
        now contends with the next pass's set-up instead."""
        work, self._unsubmitted = self._unsubmitted, None
        if work is not None:
            self.finisher.submit(work)

    def _expect_next_prompts(self) -> None:
        """Tell an engine that encodes ahead (IMAGESMITH_ENCODE_AHEAD) which prompts the next queued generation
        jobs need, so the pass about to run encodes them between its steps. Only a hint: it never stops a pass."""
        try:  # whatever goes wrong here, the worker goes on
            engine = self._engine()
            if engine is None or engine.encode_ahead is None:
                return
            generator = self.sources.get(SourceName.GENERATE)
            limit = generator.max_batch_images() if isinstance(generator, GenerateSource) else 1
            requests = [ImageRequest.model_validate(job.request) for job in self.store.oldest_queued(limit)]
            engine.encode_ahead.expect_requests(
                request.generation for request in requests if SourceName.GENERATE in request.sources
            )
        except Exception:
            log.exception("looking ahead at the queued prompts failed; the next pass encodes its own")

    def _end_unfinished(self, jobs: list[JobRecord], error: Exception) -> None:
        """A pass that broke outside every job's own handling (the store failing as a job began, say) would
        leave its claimed jobs running, their waiters waiting, until a restart: end them failed now. If the
        store itself is down this fails too, and recovery at the next start ends them."""
        self._release(jobs)  # a pass that broke before its hand-over left its tokens registered
        for job in jobs:
            try:
                stored = self.store.get(job.id)
                if stored is not None and not stored.status.terminal:
                    message = f"the worker failed: {type(error).__name__}: {error}"[:2000]
                    self._finish(job, JobStatus.FAILED, error={"code": "internal_error", "message": message})
            except Exception:
                log.exception("could not end job %s after the worker failed; trying again", job.id)
                self._stranded.add(job.id)

    def _release_stranded(self) -> None:
        """Try again, each round until the store takes it, to end the jobs _end_unfinished could not (their
        result and their failure both unwritable, on a full disk): requeued, or failed once their attempts
        are used. They stayed "running", their waiters waiting, until the next restart."""
        for job_id in list(self._stranded):
            try:
                job = self.store.release_stranded(job_id, self.settings.max_attempts)
            except Exception:
                return  # the store still fails: next round
            self._stranded.discard(job_id)
            if job is not None and job.status.terminal:
                self._announce_end(job, "its result could not be stored")
            elif job is not None:
                log.warning("job %s back in the queue: its result could not be stored", job_id)

    def _end_canceled_queued(self) -> None:
        """Queued jobs flagged for cancel are never claimed: end them, and tell their listeners."""
        for job in self.store.cancel_flagged_queued():
            self.announce_canceled_while_queued(job)

    def announce_canceled_while_queued(self, job: JobRecord) -> None:
        """A queued job the store has just ended as canceled: counted with the jobs that ended running (the
        metric counted only those), logged, and told to its listeners."""
        log.info("job canceled while queued", extra={"job_id": job.id})
        self.metrics.jobs_finished.labels(job.status.value).inc()
        self.hub.publish(job.id, job.status.value, job.terminal_event_data(), terminal=True)

    def _claim(self) -> list[JobRecord]:
        """The oldest queued job it may run, plus queued jobs that can share its pipeline pass (see the
        module doc)."""
        if self.sources.status(SourceName.GENERATE).state is SourceState.FAILED:
            jobs = self.store.claim_where(
                lambda job: self._gpu_loop_takes(job) and self._servable_without_models(job), limit=1
            )  # past the held generations
        elif self._stock_thread is not None:
            jobs = self.store.claim_where(self._gpu_loop_takes, limit=1)  # past the stock lane's jobs
        else:
            jobs = self.store.claim(1)  # the head of the queue, one row read: the path between two passes
        if not jobs:
            return jobs
        # The first job is RUNNING in the store from here on: if gathering company fails (a locked database),
        # run it alone rather than drop it, or it would stay running, unrun, until a restart.
        try:
            return jobs + self._claim_company(jobs[0])
        except Exception:
            log.exception("claiming jobs to batch with %s failed; running it alone", jobs[0].id)
            return jobs

    def _servable_without_models(self, job: JobRecord) -> bool:
        """While the models failed to load: a job another source it allows can serve. A generation stays
        queued for the restart that fixes the models (health says "failed"; accepted jobs are kept), where
        claiming it would fail it, and with it every job accepted before the failed start."""
        try:
            allowed = ImageRequest.model_validate(job.request).sources
        except ValueError:
            return True  # claimed, it fails with its own error
        others = (self.sources.status(name).state for name in allowed if name is not SourceName.GENERATE)
        return SourceName.GENERATE not in allowed or any(
            state in (SourceState.READY, SourceState.BLOCKED) for state in others
        )

    def _claim_company(self, first: JobRecord) -> list[JobRecord]:
        """Queued jobs that can share `first`'s pipeline pass, claimed; none when it cannot share one.

        batch_window_ms is how long a job may wait for company counted from its submission, not from its claim:
        company already queued joins at once, and only a job younger than the window waits, for what is left of
        it, while its pass has room. Under load every job has sat in the queue through the pass before, so the GPU
        goes from one pass to the next without idling for the window (counted from the claim, it idled the whole
        window before every pass: 20 ms by default, 1.5 % of a 1.33 s ensemble)."""
        generator = self.sources.get(SourceName.GENERATE)
        if not isinstance(generator, GenerateSource):
            return []
        budget = generator.max_batch_images() - _images_of(first)
        key = generation_batch_key(first)
        # A job that was running when the process died (attempts above one at its claim; a clean shutdown's
        # requeue gives its attempt back) may be what killed it: it runs alone, and is taken as no one's company,
        # so it cannot use up the attempts of jobs that only shared its pass.
        if key is None or budget <= 0 or first.attempts > 1:
            return []

        def fits(job: JobRecord) -> bool:
            nonlocal budget
            images = _images_of(job)
            if job.attempts > 0 or images > budget or generation_batch_key(job) != key:
                return False
            budget -= images
            return True

        window = self.settings.batch_window_ms / 1000
        # created_at is the store's wall clock; clamped, so a clock set back never stretches the wait past one
        # window (one set forward may cut a young job's wait short).
        waited = min(max(time.time() - first.created_at, 0.0), window)
        deadline = time.monotonic() + window - waited
        company = self.store.claim_where(fits, limit=generator.max_batch_images())
        if budget > 0 and deadline > time.monotonic():
            self._submit_finishing()  # about to wait for company: the last pass's results must not wait too
        while budget > 0 and not (self._stopping or self._claims_paused):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with self._wake:  # a new job, a stop or a pause notifies: look again at once
                self._wake.wait(timeout=left)
            if self._stopping or self._claims_paused:
                break
            try:
                company += self.store.claim_where(fits, limit=generator.max_batch_images())
            except Exception:
                # The jobs claimed so far are RUNNING in the store: run them rather than drop them (they would stay
                # running, unrun, until a restart). `budget` may count the failed claim's rows, so stop here.
                log.exception(
                    "claiming more jobs to batch with %s failed; running the %d claimed",
                    first.id,
                    1 + len(company),
                )
                break
        return company

    def run_batch(self, jobs: list[JobRecord]) -> None:
        if len(jobs) > 1:
            self._run_generation_batch(jobs)
            return
        for job in jobs:
            token = current_job.set(job.id)
            try:
                self._run_one(job)
            finally:
                current_job.reset(token)

    def _run_generation_batch(self, jobs: list[JobRecord]) -> None:
        """Compatible generation jobs in one engine pass; then each job is finished on its own."""
        self.metrics.batch_images.observe(sum(_images_of(job) for job in jobs))
        log.info("running %d jobs as one batch: %s", len(jobs), ", ".join(job.id for job in jobs))
        starts = {job.id: self._begin(job) for job in jobs}
        if len(jobs) > 1:
            with self._tokens_lock:
                self._batched.update(job.id for job in jobs)
        requests = [ImageRequest.model_validate(job.request) for job in jobs]
        items = [
            BatchItem(request.generation, ProgressTracker(self, job, request), starts[job.id][0])
            for job, request in zip(jobs, requests, strict=True)
        ]
        generator = self.sources.get(SourceName.GENERATE)
        assert isinstance(generator, GenerateSource)
        try:
            outcomes: list[SourceResult | BaseException] = generator.fetch_batch(items)
        except Exception as error:  # the whole pass failed (engine gone, ...): every job gets the error
            outcomes = [error for _ in jobs]
        self._hand_over(
            [
                EndedJob(job, starts[job.id][1], self._batch_outcome(outcome))
                for job, outcome in zip(jobs, outcomes, strict=True)
            ]
        )

    def _hand_over(self, ended: list[EndedJob]) -> None:
        """The pass is off the GPU: its files are made and its jobs ended on the finishing thread, while this
        thread claims the next jobs (jobs/finishing.py), the loop's claim first (_submit_finishing).

        The jobs leave the cancel bookkeeping here, on this thread: from now on a cancel cannot change what the
        pass made (Worker.cancel says False, and JobService reports the job as it ends), and the jobs on the GPU
        are the next pass's alone (on_gpu). Whether a client had asked to cancel is kept with each job."""
        explicit = self._release([item.job for item in ended])
        finishing = [item._replace(explicit_cancel=explicit[item.job.id]) for item in ended]
        work = functools.partial(self._finish_pass, finishing)
        on_the_loop = threading.current_thread() is self._thread
        if on_the_loop:
            # A pass held back goes first, whichever way this one goes: passes end in the order they ran (a
            # finisher closed by a stop that timed out runs this one inline, and would have run it first).
            self._submit_finishing()
        if self.settings.claim_before_hand_over and self.finisher.running and on_the_loop:
            # The loop's pass: handed over after the next claim (_submit_finishing). Inline finishing keeps its
            # order (the next job claimed after the last one ended).
            self._unsubmitted = work
        else:
            self.finisher.submit(work)

    def _release(self, jobs: list[JobRecord]) -> dict[str, bool]:
        """Forget the jobs' cancel tokens; returns, for each, whether a client had asked to cancel it."""
        with self._tokens_lock:
            explicit = {job.id: job.id in self._explicit_cancels for job in jobs}
            for job in jobs:
                self._tokens.pop(job.id, None)
                self._explicit_cancels.discard(job.id)
                self._batched.discard(job.id)
        return explicit

    def on_gpu(self) -> set[str]:
        """The jobs whose pass is running now (not those whose images are being stored)."""
        with self._tokens_lock:
            return set(self._tokens)

    def _finish_pass(self, ended: list[EndedJob]) -> None:
        try:
            served = [item.outcome for item in ended if isinstance(item.outcome, Served)]
            encode_pending([image for outcome in served for image in outcome.result.images])
            pass_counted = False  # the pass's stage times go into the histogram once, not once per job
            for item in ended:
                token = current_job.set(item.job.id)
                try:
                    succeeded = self._complete(item, count_stages=not pass_counted)
                    pass_counted = pass_counted or succeeded
                except Exception as error:  # this job only: its batch-mates' outcomes are still to be stored
                    if self._stopping and store_busy(error):
                        # Not failed: it stays running in the store, and the next start runs it again (recover),
                        # as it would a job whose pass the stop cut short.
                        log.warning("job left to run again at the next start: the store is busy (%s)", error)
                        continue
                    log.exception("ending the job failed")
                    self._end_unfinished([item.job], error)
                finally:
                    current_job.reset(token)
        except Exception as error:  # as in the loop: jobs the store could not end are ended failed
            log.exception("finishing a pass failed")
            self._end_unfinished([item.job for item in ended], error)

    def _batch_outcome(self, outcome: SourceResult | BaseException) -> Served | BaseException:
        """A batched job's outcome as the single-job path (serve_first, then _fetch) tells it: a result served
        by generation, or generation passed over as SourcesExhausted; its attempt counted in the metrics
        alike. Other errors (a cancel, out of memory) count no attempt there either."""
        if isinstance(outcome, SourceUnavailable) and not isinstance(outcome, SourcesExhausted):
            attempt = SourceAttempt(
                source=SourceName.GENERATE,
                served=False,
                reason=outcome.reason,
                detail=str(outcome),
                retry_at=outcome.retry_at,
            )
            outcome = SourcesExhausted([attempt])
        if isinstance(outcome, SourcesExhausted):
            self._count_attempts(outcome.attempts)
            return outcome
        if isinstance(outcome, BaseException):
            return outcome
        served = served_directly(outcome)
        self._count_attempts(served.attempts)
        return served

    def _engine(self) -> Engine | None:
        """The generation source's engine, once loaded."""
        generator = self.sources.get(SourceName.GENERATE)
        return generator.engine if isinstance(generator, GenerateSource) else None

    def empty_stage(self, request: ImageRequest) -> str | None:
        """Why the engine would refuse this request's ensemble split (a stage with no step), once it is loaded;
        None when the split is fine or no engine is there yet to say (the engine checks again when it runs)."""
        engine = self._engine()
        return None if engine is None else engine.empty_stage(request.generation.resolve())

    def planned_steps(self, request: ImageRequest) -> dict[str, int]:
        """Steps per stage for progress totals and the ETA: the engine's own plan when it is loaded."""
        engine = self._engine()
        if engine is None:
            return {"base": request.generation.resolve().num_inference_steps}
        return dict(engine.planned_steps(request.generation))

    def _begin(self, job: JobRecord) -> tuple[CancelToken, float]:
        """Register the job's cancel token and announce that it runs."""
        cancel = CancelToken()
        with self._tokens_lock:
            self._tokens[job.id] = cancel
        # Read the flag now, not from the claimed record: a cancel that came between the claim and this token
        # found no token to trip (Worker.cancel said False) and lives only in the store. Registering first, then
        # reading, leaves no gap: a later cancel finds the token.
        stored = self.store.get(job.id)
        if stored is not None and stored.cancel_requested:
            with self._tokens_lock:
                self._explicit_cancels.add(job.id)
            cancel.cancel()
        elif self._stopping:
            cancel.cancel()
        log.info("job started (attempt %d)", job.attempts)
        self.hub.publish(job.id, "status", {"job_id": job.id, "status": "running", "attempt": job.attempts})
        return cancel, time.perf_counter()

    def _run_one(self, job: JobRecord) -> None:
        cancel, started = self._begin(job)
        outcome: Served | BaseException
        try:
            request = ImageRequest.model_validate(job.request)
            outcome = self._fetch(request, job, cancel)
        except Exception as error:  # finished later, in the one place that turns outcomes into job states
            outcome = error
        self._hand_over([EndedJob(job, started, outcome)])

    def _complete(self, ended: EndedJob, count_stages: bool = True) -> bool:
        """Store the images and record the job's final state (or put it back in the queue on shutdown).
        Returns whether the job succeeded. `count_stages`: whether its stages go into the stage histogram
        (a batch's jobs share one pass, which is counted once)."""
        job, started, outcome, explicit_cancel = ended
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            served = outcome
            result = served.result
            # Encoded first (image.data encodes a pending image): a failed encoding is the generation's failure,
            # and only the files' write below is the data dir's.
            encoded = [(image.data, image.media_type) for image in result.images]
            try:
                stored = [self.files.put(data, media_type) for data, media_type in encoded]
            except OSError as error:
                raise ImageWriteFailed(f"{type(error).__name__}: {error}") from error
            payload = {
                "source": result.source.value,
                "source_reason": served.summary,
                "attempts": [attempt.model_dump(mode="json") for attempt in served.attempts],
                "images": [
                    {
                        "url": f"/v1/images/{item.name}",
                        "sha256": item.sha256,
                        "media_type": item.media_type,
                        "bytes": item.size,
                        "width": image.width,
                        "height": image.height,
                    }
                    for item, image in zip(stored, result.images, strict=True)
                ],
                "attribution": result.attribution,
                "metadata": result.metadata,
            }
        except GenerationCanceled:
            # A clean shutdown puts the job back, unless a client's cancel reached the store (requeue says
            # False): that one ends canceled, as it would have if the cancel had reached this token.
            if self._stopping and not explicit_cancel and self.store.requeue(job.id):
                log.info("job put back in the queue: server shutting down")
            else:
                self._finish(job, JobStatus.CANCELED, error=CANCELED_WHILE_RUNNING)
        except SourceUnavailable as error:
            log.warning("job failed: %s", error)
            self._finish(job, JobStatus.FAILED, error=source_error(error))
        except ImageWriteFailed as error:
            self._release_unwritten(job, error)
        except Exception as error:
            log.exception("job failed")
            self._finish(
                job,
                JobStatus.FAILED,
                error={"code": "generation_failed", "message": f"{error}"[:2000] or type(error).__name__},
            )
        else:
            # Outside the handlers above: the images are made and stored, so a store that fails to record
            # that is not the generation failing (its error goes to _finish_pass, which ends this job alone).
            self._finish(job, JobStatus.SUCCEEDED, result=payload)
            if count_stages:
                for stage in result.metadata.get("stages", []):
                    self.metrics.stage_seconds.labels(stage["name"]).observe(stage["seconds"])
            return True
        finally:
            self.live.pop(job.id, None)
            self.metrics.job_seconds.observe(time.perf_counter() - started)
        return False

    def _release_unwritten(self, job: JobRecord, error: ImageWriteFailed) -> None:
        """Its images were made, but the data dir refused them (a full or failing disk): not the generation
        failing. The job goes back in the queue to run again, or, its attempts used, fails as storage_error
        (JobStore.release_stranded). Claims pause a while, and health says why (image_write_failure)."""
        now = time.monotonic()
        self.image_write_failure = (now, str(error))
        self._claims_resume_at = now + IMAGE_WRITE_PAUSE_S
        log.error("the job's images could not be written to %s: %s", self.files.root, error)
        try:
            released = self.store.release_stranded(job.id, self.settings.max_attempts)
        except Exception:
            log.exception("could not put job %s back in the queue; trying again", job.id)
            self._stranded.add(job.id)
            return
        if released is not None and released.status.terminal:
            self._announce_end(released, "its images could not be written")
        elif released is not None:
            log.warning("job back in the queue: its images could not be written")
            self.hub.publish(job.id, "status", {"job_id": job.id, "status": released.status.value})

    def _announce_end(self, ended: JobRecord, why: str) -> None:
        """A job that JobStore.release_stranded ended (its attempts used): counted and told to its listeners,
        as _finish does for the ends it writes."""
        log.warning("job %s ended %s: %s", ended.id, ended.status.value, why)
        self.metrics.jobs_finished.labels(ended.status.value).inc()
        self.hub.publish(ended.id, ended.status.value, ended.terminal_event_data(), terminal=True)

    def _fetch(self, request: ImageRequest, job: JobRecord, cancel: CancelToken) -> Served:
        """Try the request's sources in order (fallback.py); the first that serves wins. Counts every attempt."""
        try:
            served = serve_first(request, self.sources.get, ProgressTracker(self, job, request), cancel)
        except SourcesExhausted as exhausted:
            self._count_attempts(exhausted.attempts)
            raise
        self._count_attempts(served.attempts)
        if served.passed:
            log.info("served by %s after %s", served.source.value, served.summary)
        return served

    def _finish_write(
        self,
        job_id: str,
        status: JobStatus,
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
        patient: bool,
    ) -> bool:
        delay_s = FINISH_RETRY_FIRST_S
        while True:
            try:
                return self.store.finish(job_id, status, result=result, error=error)
            except sqlite3.OperationalError as store_error:
                # Stopping: give up; the job is still running in the store, and the next start runs it again.
                # A success's end waits out a full or failing disk as it waits out a lock: its images are made
                # and on disk, and giving up put the job back in the queue (an attempt spent, the images made
                # again) or failed it as storage_error once the store took writes again. A failure's end gives up
                # (the job goes back in the queue: Worker._release_stranded), so it may run again and succeed.
                waits = store_busy(store_error) or (
                    status is JobStatus.SUCCEEDED and store_unwritable(store_error)
                )
                if not (patient and waits) or self._stopping:
                    raise
                log.warning(
                    "the job store cannot take the job's end (%s); recording job %s again in %.1f s",
                    store_error,
                    job_id,
                    delay_s,
                )
                if self._stop_requested.wait(delay_s):  # a stop does not wait out the backoff
                    raise
                delay_s = min(delay_s * 2, FINISH_RETRY_MAX_S)

    def _count_attempts(self, attempts: list[SourceAttempt]) -> None:
        for attempt in attempts:
            outcome = "served" if attempt.served else attempt.reason.value
            self.metrics.source_attempts.labels(attempt.source.value, outcome).inc()

    def _finish(
        self,
        job: JobRecord,
        status: JobStatus,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        patient: bool = True,
    ) -> None:
        """Record the job's end and tell its listeners. `patient`: while the store is busy (another program
        holding its lock, the API's writes queued ahead), wait and try again rather than fail; the worker's
        threads are patient (a lock held past the busy timeout made a generated image a failed job), a
        request's thread is not (it answers within its bound: store_writes.py)."""
        if self._finish_write(job.id, status, result, error, patient):
            self.metrics.jobs_finished.labels(status.value).inc()
            # Named, not left to the thread's current job: a batch's jobs end one after another outside it.
            log.info("job %s", status.value, extra={"job_id": job.id})
        # Read back, not assumed: finish() changes nothing when the job already ended (a cancel won the race),
        # and the event must tell what the store holds.
        final = self.store.get(job.id)
        if final is None:  # deleted underneath us; still end the stream for its listeners
            data = {"job_id": job.id, "status": status.value, "result": None, "error": None}
            self.hub.publish(job.id, status.value, data, terminal=True)
            return
        self.hub.publish(job.id, final.status.value, final.terminal_event_data(), terminal=True)
