"""A job plus a wait, shared by the seed's endpoint (media.py) and the compatibility APIs.

All three are synchronous: the client sends one request and expects the pictures in the answer. So they
submit an ordinary job and wait for it; there is no second generation path.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from imagesmith.api.errors import ApiError
from imagesmith.api.store_writes import in_write_thread
from imagesmith.jobs.service import SHUTDOWN_RETRY_AFTER_S, JobService
from imagesmith.jobs.store import JobRecord, JobStatus
from imagesmith.sources.base import ImageRequest
from imagesmith.storage.files import ImageFiles


async def submit_and_wait(
    service: JobService,
    request: ImageRequest,
    timeout_s: float,
    idempotency_key: str | None = None,
    on_submitted: Callable[[str], None] | None = None,
) -> JobRecord:
    """Submit (an Idempotency-Key header makes a retried request wait for the first job) and wait.
    `on_submitted` hears the job id before the wait begins (A1111's progress and interrupt look for it)."""
    # Off the event loop: a submit writes (and fsyncs) the store, and waits out another program's lock on it.
    job, _ = await in_write_thread(lambda: service.submit(request, idempotency_key), service.store)
    if on_submitted is not None:
        on_submitted(job.id)
    job = await service.wait(job.id, timeout_s)
    if service.shutting_down and not job.status.terminal:
        # An answer now, before the grace period ends and the connection is cut. The job is kept: a client
        # that retries (with its Idempotency-Key) or polls the job after the restart gets its image.
        again = (
            "or send the request again with the same Idempotency-Key"
            if idempotency_key is not None
            else "sending the request again would make a second job"
        )
        raise ApiError(
            503,
            "shutting_down",
            f"the server is restarting; job {job.id} is kept and runs when it is back "
            f"(GET /v1/jobs/{job.id} for its result; {again})",
            headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S), "x-should-retry": "false"},
            extra={"job_id": job.id},
        )
    return job


def stored_image_base64(files: ImageFiles, image: dict[str, Any]) -> str:
    """A job result's image (an entry of result["images"]) read from storage, base64 for a JSON answer."""
    path = files.get(image["url"].rsplit("/", 1)[-1])
    if path is None:  # deleted between the job and now; nothing the client can fix by retrying
        raise ApiError(500, "image_missing", f"image {image['sha256']} is gone from storage")
    return base64.b64encode(path.read_bytes()).decode("ascii")


def succeeded_result(
    job: JobRecord, timeout_s: float, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """The result of a job that succeeded; an ApiError naming what happened otherwise. `headers` ride on that
    error (the OpenAI client, for one, must not retry a job that failed or is still running)."""
    if job.status is JobStatus.SUCCEEDED and job.result:
        return job.result
    if not job.status.terminal:
        raise ApiError(
            504,
            "timeout",
            f"the image is not ready after {timeout_s:.0f}s; it is still being made as job {job.id} "
            f"(GET /v1/jobs/{job.id})",
            headers=headers,
            extra={"job_id": job.id},
        )
    error = job.error or {}
    status = 409 if job.status is JobStatus.CANCELED else 502
    raise ApiError(
        status,
        error.get("code", job.status.value),
        error.get("message", f"job {job.status.value}"),
        headers=headers,
    )
