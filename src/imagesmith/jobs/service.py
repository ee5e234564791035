"""The job service: what the HTTP layer calls. Admission (limits, sources, queue bound), views, cancel, waiting.

It raises domain errors (ServiceError subclasses, QueueFull, IdempotencyConflict) and never HTTP ones; the api
package's errors.py maps them to statuses in one place.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import ValidationError

from imagesmith.config import Settings
from imagesmith.jobs.events import SHUTDOWN, Event, EventHub
from imagesmith.jobs.store import JobRecord, JobStatus, JobStore
from imagesmith.jobs.worker import Worker
from imagesmith.schemas import GenerationRequest, draw_seed
from imagesmith.sources.base import ImageRequest, SourceName, SourceState
from imagesmith.sources.registry import SourceRegistry

log = logging.getLogger(__name__)

RETRY_AFTER_STARTING_S = 10


class ServiceError(Exception):
    """A request the service will not take, with a code and the field to blame."""

    code = "service_error"

    def __init__(self, message: str, field: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message, self.field, self.retry_after = message, field, retry_after


class InvalidIdempotencyKey(ServiceError):
    code = "invalid_request"


# What an Idempotency-Key may be: it is stored and compared as given, so keep it printable and bounded.
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


class LimitExceeded(ServiceError):
    code = "limit_exceeded"


class InvalidGeneration(ServiceError):
    """Settings the schema accepts but the loaded model's scheduler cannot run as asked (the ensemble's split)."""

    code = "invalid_request"


class StockNotConfigured(ServiceError):
    code = "stock_not_configured"

    @classmethod
    def with_fix(cls, fix: str, field: str) -> StockNotConfigured:
        """The error with the fix in the route's terms: `sources` on /v1/jobs, `use_generation` on the seed's
        endpoint."""
        return cls(
            f"stock photo search is not configured on this server, and this request allows no other source; {fix}",
            field,
        )


SHUTDOWN_RETRY_AFTER_S = 30  # what a client is told to wait for the restart


class ShuttingDown(ServiceError):
    """The server is stopping: come back after its restart (Retry-After); a job already taken is kept."""

    code = "shutting_down"


class SourcesStarting(ServiceError):
    code = "starting"


class SourcesUnavailable(ServiceError):
    code = "source_unavailable"


class JobNotFound(ServiceError):
    code = "not_found"


def too_many_images(count: object, limit: int) -> str:
    """The answer to a num_images past the server's limit, whichever check finds it (this service, or the
    schema's ceiling: api/errors.py)."""
    return (
        f"num_images is {count}; this server makes at most {limit} per request (max_images_per_request): ask for "
        f"{limit} or fewer, in several requests if you need more"
    )


def too_long_text(field: str, length: int, limit: int) -> str:
    """The answer to a prompt or negative prompt past the server's limit, whichever check finds it (this service,
    or the schema's ceiling of 2000: api/errors.py)."""
    return f"{field} is {length} characters; this server takes at most {limit} (max_prompt_chars): shorten it"


class JobService:
    def __init__(
        self, settings: Settings, store: JobStore, sources: SourceRegistry, hub: EventHub, worker: Worker
    ) -> None:
        self.settings, self.store, self.sources, self.hub, self.worker = settings, store, sources, hub, worker
        self._shutting_down = False

    # --- admission ---

    def _stock_may_serve(self, request: ImageRequest) -> bool:
        """Pexels is asked for and configured (a server without a key generates whatever the flags say)."""
        return (
            SourceName.STOCK in request.sources
            and self.sources.status(SourceName.STOCK).state is not SourceState.NOT_CONFIGURED
        )

    def _default_size(self, request: ImageRequest) -> tuple[int, int]:
        """A featured photo is a landscape hero by default (stock_default_size) when Pexels may serve the
        request; otherwise the seed's square default_width x default_height."""
        if self._stock_may_serve(request):
            return self.settings.stock_size()
        return self.settings.default_width, self.settings.default_height

    def prepare(self, request: ImageRequest) -> ImageRequest:
        """Apply the server's default size and its limits; raise with the field to blame."""
        generation = request.generation
        if generation.seed is None:
            # Drawn now and stored with the job, not when it runs: a run after a crash makes the image its
            # first run was making (and its previews showed), and the client sees its seed from the start.
            generation = generation.model_copy(update={"seed": draw_seed()})
        if generation.aspect is None and (generation.width is None or generation.height is None):
            # The server's default for each side the request leaves out: one side alone took the schema's 1024
            # for the other, whatever the server's default.
            width, height = self._default_size(request)
            try:
                generation = GenerationRequest.model_validate(
                    {
                        **generation.model_dump(exclude_unset=True),
                        "width": generation.width or width,
                        "height": generation.height or height,
                    }
                )
            except ValidationError as error:  # the server's defaults clash with the request (a config error)
                raise LimitExceeded(
                    f"the server's default size does not fit this request: {error}", "width"
                ) from error
        limits = self.settings
        for field in ("prompt", "negative_prompt"):
            length = len(getattr(generation, field))
            if length > limits.max_prompt_chars:
                raise LimitExceeded(too_long_text(field, length, limits.max_prompt_chars), field)
        if generation.num_images > limits.max_images_per_request:
            raise LimitExceeded(
                too_many_images(generation.num_images, limits.max_images_per_request), "num_images"
            )
        if generation.num_images > 1 and self._stock_may_serve(request):
            # One photo, one credit: a stock answer is a single picture. Say so rather than return fewer.
            raise LimitExceeded(
                f"num_images is {generation.num_images}, but a Pexels photo comes one per request; set "
                "num_images=1, or leave Pexels out to generate several (use_pexels=false on "
                '/api/media/generate-image, sources=["generate"] on /v1/jobs)',
                "num_images",
            )
        resolved = generation.resolve()
        pixels = resolved.width * resolved.height * resolved.num_images
        if pixels > limits.max_total_pixels:
            raise LimitExceeded(
                f"{resolved.num_images} image(s) of {resolved.width}x{resolved.height} are {pixels} pixels; this "
                f"server allows {limits.max_total_pixels} per request; lower the size or num_images",
                "width",
            )
        return request.model_copy(update={"generation": generation})

    def check_generation(self, request: ImageRequest) -> None:
        """Refuse a split the loaded model's scheduler cannot run (a stage with no step), naming the field,
        rather than accept a job that can only fail. Before the model has loaded, the engine checks it."""
        if SourceName.GENERATE in request.sources:
            empty_stage = self.worker.empty_stage(request)
            if empty_stage is not None:
                raise InvalidGeneration(empty_stage, "high_noise_frac")

    def check_sources(self, request: ImageRequest) -> None:
        """Refuse at once what no source can serve, rather than accept a job that can only fail."""
        states = {name: self.sources.status(name) for name in request.sources}
        # A blocked source (spent quota) may still serve from its cache; the job will say why if it cannot.
        if any(status.state in (SourceState.READY, SourceState.BLOCKED) for status in states.values()):
            return
        configured = {n: s for n, s in states.items() if s.state is not SourceState.NOT_CONFIGURED}
        if not configured:
            if SourceName.STOCK in states:
                raise StockNotConfigured.with_fix(
                    'add "generate" to sources to generate the image instead', "sources"
                )
            raise SourcesUnavailable("none of the requested sources is configured on this server", "sources")
        if any(s.state is SourceState.STARTING for s in configured.values()):
            raise SourcesStarting(
                "the models are still loading; retry shortly", None, retry_after=RETRY_AFTER_STARTING_S
            )
        details = "; ".join(f"{n.value}: {s.detail}" for n, s in configured.items())
        raise SourcesUnavailable(f"no requested source is available ({details})", "sources")

    def submit(self, request: ImageRequest, idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
        """Every route submits here, so the Idempotency-Key check lives here too (no route can skip it)."""
        if self._shutting_down:
            raise ShuttingDown(
                "the server is restarting and takes no new job now; send it again shortly",
                retry_after=SHUTDOWN_RETRY_AFTER_S,
            )
        if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
            raise InvalidIdempotencyKey(
                "Idempotency-Key must be 1-200 visible ASCII characters", "Idempotency-Key"
            )
        # The key stands for what the client sent, not what this server made of it: hash before prepare()
        # fills in defaults, so a retry stays a replay after the server's default size changes.
        sent = request.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).hexdigest()
        if idempotency_key is not None:
            # A replay answers with its job before any admission check: the job exists whatever the sources
            # say now (models still loading after a restart, or failed to load).
            existing = self.store.find_idempotent(idempotency_key, digest)
            if existing is not None:
                return existing, False
        request = self.prepare(request)
        self.check_sources(request)
        self.check_generation(request)
        body = request.model_dump(mode="json")
        job, created = self.store.submit(body, digest, idempotency_key, self.settings.queue_max)
        if created:
            log.info("job accepted", extra={"job_id": job.id})
            self.worker.notify()
        return job, created

    # --- reading ---

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id!r}", "job_id")
        return job

    def queue_positions(self) -> dict[str, int]:
        """Each queued job's id -> the queued jobs ahead of it in the line it waits in (Worker.line_of)."""
        return self.store.queue_positions(self.worker.line_of)

    def view(self, job: JobRecord, queue_positions: dict[str, int] | None = None) -> dict[str, Any]:
        """The job envelope: id, status, progress, timestamps, result or error. A listing passes the
        queue positions it read once for all its jobs."""
        live = self.worker.live.get(job.id) if job.status is JobStatus.RUNNING else None
        position = None
        if job.status is JobStatus.QUEUED:
            positions = queue_positions if queue_positions is not None else self.queue_positions()
            position = positions.get(job.id, 0)  # claimed since it was read: nothing is ahead of it
        return {
            "id": job.id,
            "status": job.status.value,
            "stage": live.stage if live else None,
            "step": live.step if live else None,
            "total": live.total if live else None,
            "progress": live.fraction if live else None,
            "eta_s": live.eta_rounded_s if live else None,
            "queue_position": position,
            "attempts": job.attempts,
            "cancel_requested": job.cancel_requested,
            "request": job.request,
            "result": job.result,
            "error": job.error,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
        }

    def live_preview(self, job_id: str) -> str | None:
        """The running job's latest preview (a JPEG data: URL), or None before the first one."""
        preview = self.hub.latest(job_id, "preview")
        return preview if isinstance(preview, str) else None

    # --- cancel ---

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.status is JobStatus.QUEUED and self.store.cancel_queued(job_id):
            final = self.get(job_id)
            self.worker.announce_canceled_while_queued(final)
            return final
        job = self.get(job_id)
        if job.status is JobStatus.RUNNING:
            self.store.request_cancel(job_id)
            self.worker.cancel(job_id)
            log.info("cancel requested for running job", extra={"job_id": job_id})
            job = self.get(job_id)
            if job.status is JobStatus.QUEUED and self.store.cancel_queued(job_id):
                # A shutdown put it back in the queue between our read and the flag: claims skip a flagged
                # row, so end it here rather than leave it queued.
                job = self.get(job_id)
                self.worker.announce_canceled_while_queued(job)
        return job  # finished already: cancel is a no-op, the envelope says how it ended

    # --- waiting and events ---

    async def events(
        self, job_id: str, heartbeat_s: float = 15.0, after_id: int = 0
    ) -> AsyncGenerator[Event | None, None]:
        """The job's events in order, ending with its terminal event; None now and then as a heartbeat.
        `after_id`: a reconnecting client's last event; earlier ones are not sent again (the final one always
        is). Ids start at each process's start time in microseconds (EventHub), so an id kept from before a
        restart is below every id of the rerun, which is sent whole."""
        backlog, queue = self.hub.subscribe(job_id)
        try:
            job = self.get(job_id)
            if job.status.terminal:
                yield self._terminal_from_store(job)
                return
            if self._shutting_down:  # subscribed after the streams were ended: nothing more will come
                return
            last_id = after_id
            for event in backlog:
                if event.id <= last_id:
                    continue
                last_id = event.id
                yield event
            while True:
                try:
                    # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the cancel of a timeout
                    # around it (a caller's wait) when its own timeout fires at the same moment.
                    async with asyncio.timeout(heartbeat_s):
                        event = await queue.get()
                except TimeoutError:
                    # The worker may have finished while no event could reach us; the store knows.
                    job = self.get(job_id)
                    if job.status.terminal:
                        yield self._terminal_from_store(job)
                        return
                    yield None
                    continue
                if event.type == SHUTDOWN:
                    return  # the server is stopping: the job stays as it is (queued jobs run after restart)
                if event.id <= last_id and not event.terminal:
                    continue  # already replayed from the backlog, or seen before the client reconnected
                last_id = event.id
                yield event
                if event.terminal:
                    return
        finally:
            self.hub.unsubscribe(job_id, queue)

    def _terminal_from_store(self, job: JobRecord) -> Event:
        return Event(id=0, type=job.status.value, data=job.terminal_event_data(), terminal=True)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def begin_shutdown(self) -> None:
        """The server was told to stop (SIGTERM): claim no new job, and end every wait and event stream now,
        so that a client waiting for an image gets an answer (503, its job id) instead of a dropped
        connection when the grace period ends. Jobs stay in the store; queued ones run after the restart."""
        self._shutting_down = True
        self.worker.pause_claims()
        self.hub.end_all_streams()

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """Until the job finishes or `timeout` passes; returns the job as it then stands."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stream = self.events(job_id, heartbeat_s=min(5.0, timeout))
        try:
            # One timeout around the whole loop: cancelling a pending anext() (asyncio.wait_for per event)
            # leaves the generator marked running, and its aclose() then raises. The deadline is checked at
            # each event and heartbeat too: a cancel lost in a race still ends the wait within a heartbeat
            # (a 0.2 s wait on a job sending progress every step twice lasted the whole 9 s job in tests).
            async with asyncio.timeout_at(deadline):
                async for event in stream:
                    if (event is not None and event.terminal) or loop.time() >= deadline:
                        break
        except TimeoutError:
            pass
        finally:
            await stream.aclose()
        return self.get(job_id)
