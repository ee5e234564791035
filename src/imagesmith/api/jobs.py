"""Async jobs: submit (202), read, list, cancel, and follow progress as server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, BeforeValidator, Field

from imagesmith.api.deps import Authorized, ServiceDep
from imagesmith.api.errors import ApiError
from imagesmith.api.store_writes import in_write_thread
from imagesmith.api.text_check import TextCheckedRoute
from imagesmith.jobs.store import JobStatus
from imagesmith.schemas import GenerationRequest
from imagesmith.sources.base import ImageRequest, SourceName

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Authorized], route_class=TextCheckedRoute)


class JobCreate(GenerationRequest):
    """A generation request plus where the image may come from (default: generate)."""

    sources: list[SourceName] = Field(
        default_factory=lambda: [SourceName.GENERATE],
        min_length=1,
        max_length=2,
        description="Sources to try, in order: 'generate', 'stock'.",
    )
    title: str | None = Field(None, max_length=200)
    keywords: list[str] = Field(default_factory=list, max_length=20)

    def to_image_request(self) -> ImageRequest:
        generation = GenerationRequest.model_validate(
            self.model_dump(exclude={"sources", "title", "keywords"}, exclude_unset=True)
        )
        sources = list(dict.fromkeys(self.sources))  # keep order, drop repeats
        return ImageRequest(sources=sources, generation=generation, title=self.title, keywords=self.keywords)


class JobView(BaseModel):
    id: str
    status: JobStatus
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    progress: float | None = Field(None, description="0-1 across all stages.")
    eta_s: float | None = None
    queue_position: int | None = Field(
        None,
        description="Queued jobs ahead of this one in its line (stock-photo jobs wait in a line of their own).",
    )
    attempts: int
    cancel_requested: bool
    request: dict[str, Any]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


class JobList(BaseModel):
    jobs: list[JobView]
    total: int
    limit: int
    offset: int
    next_offset: int | None


@router.post("", status_code=202, response_model=JobView)
async def create_job(
    body: JobCreate,
    service: ServiceDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    def submit() -> dict[str, Any]:
        job, created = service.submit(body.to_image_request(), idempotency_key)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return service.view(job)

    # Not in the pool that health and the reads use (store_writes.py).
    return await in_write_thread(submit, service.store)


def _without_empty_values(values: list[str] | None) -> list[str] | None:
    """`?status=` (empty) means any status, alone or beside other values."""
    kept = [value for value in values or () if value]
    return kept or None


@router.get("", response_model=JobList)
@router.head("", response_model=JobList, include_in_schema=False)  # the same, headers only
def list_jobs(
    service: ServiceDep,
    # Repeated (`?status=queued&status=running`), the jobs in any of them: a scalar parameter would keep only
    # the last and answer a confident, wrong page. An empty value is no filter: what a form's "any" choice
    # sends (`?status=`).
    status: Annotated[list[JobStatus] | None, Query(), BeforeValidator(_without_empty_values)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> dict[str, Any]:
    jobs, total = service.store.list_jobs(status, limit, offset)
    positions = service.queue_positions()
    return {
        "jobs": [service.view(job, positions) for job in jobs],
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": offset + limit if offset + limit < total else None,
    }


@router.get("/{job_id}", response_model=JobView)
@router.head("/{job_id}", response_model=JobView, include_in_schema=False)  # does the job exist: headers only
def get_job(job_id: str, service: ServiceDep) -> dict[str, Any]:
    return service.view(service.get(job_id))


@router.post("/{job_id}/cancel", response_model=JobView, status_code=202)
async def cancel_job(job_id: str, service: ServiceDep, response: Response) -> dict[str, Any]:
    """Queued: canceled at once. Running: stops within one step (cancel_requested until it does). Canceled
    already: 200, nothing more to do. Succeeded or failed: 409, there is nothing to cancel (a 202 said the
    cancel was taken when nothing happened)."""

    def cancel() -> dict[str, Any]:
        if service.get(job_id).status is JobStatus.CANCELED:
            response.status_code = 200
        job = service.cancel(job_id)  # a no-op for a finished job
        if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            raise ApiError(
                409,
                "already_finished",
                f"job {job_id} already {job.status.value}; there is nothing to cancel",
                "job_id",
                extra={"job_id": job_id, "status": job.status.value},
            )
        return service.view(job)

    return await in_write_thread(cancel, service.store)  # a cancel writes the store (store_writes.py)


END_EVENT_ID = "end"  # the id of a job's final event
MAX_EVENT_ID_DIGITS = 18  # event ids count up from the process's start in microseconds (EventHub): 16 digits


def event_id_after(last_seen: str) -> int:
    """The event to resume after, from a Last-Event-ID header; anything that is not an event id of ours
    starts from the beginning. ASCII digits only: str.isdigit() also passes '²', which int() refuses, and
    int() refuses strings over 4300 digits; both were 500s."""
    if last_seen.isascii() and last_seen.isdigit() and len(last_seen) <= MAX_EVENT_ID_DIGITS:
        return int(last_seen)
    return 0


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(job_id: str, service: ServiceDep, request: Request) -> Response:
    """Server-sent events: `status`, `progress` (with a small `preview` data URL every few steps), and one
    final `succeeded`, `failed` or `canceled` carrying the result or error, whose id is `end`.

    A browser's EventSource reconnects by itself, sending the last id it saw (Last-Event-ID): a number resumes
    after that event; `end` means it has the outcome, and 204 tells it to stop reconnecting."""
    service.get(job_id)  # 404 before the stream starts
    last_seen = request.headers.get("last-event-id", "").strip()
    if last_seen == END_EVENT_ID:
        return Response(status_code=204)
    after_id = event_id_after(last_seen)

    async def stream() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        async for event in service.events(job_id, after_id=after_id):
            if await request.is_disconnected():
                return
            if event is None:
                yield ": keep-alive\n\n"
                continue
            ident = f"id: {END_EVENT_ID}\n" if event.terminal else f"id: {event.id}\n" if event.id else ""
            yield f"{ident}event: {event.type}\ndata: {json.dumps(event.data)}\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
