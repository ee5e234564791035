"""Health: one report, a state (starting, ready, degraded, failed) with reasons, and the details behind it."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from imagesmith.api.deps import holds_api_key
from imagesmith.jobs.store import JobStatus, JobStore
from imagesmith.sources.base import SourceName, SourceState

router = APIRouter(tags=["health"])


def health_report(app: FastAPI) -> dict[str, Any]:
    state = app.state
    statuses = state.sources.statuses()
    generate, stock = statuses[SourceName.GENERATE], statuses[SourceName.STOCK]
    counts = state.store.counts()
    reasons: list[str] = []
    engine = state.generate.engine
    details: dict[str, Any] = engine.describe() if engine is not None else {}
    if generate.state is SourceState.STARTING:
        status = "starting"
        reasons.append(generate.detail)  # loading, or which warm-up (compile) step, and for how long
    elif generate.state is SourceState.FAILED and not stock.ready:
        status = "failed"
        reasons.append(f"model loading failed: {generate.detail}")
    else:
        status = "ready"
        if generate.state is SourceState.FAILED:
            reasons.append(f"generation unavailable: {generate.detail}")
        if stock.state in (SourceState.BLOCKED, SourceState.FAILED):
            reasons.append(f"stock photos unavailable: {stock.detail}")
        if engine is not None and details.get("refiner") not in ("loaded", "not configured"):
            reasons.append(f"refiner {details.get('refiner')}; images are not refined")
        if counts[JobStatus.QUEUED] + counts[JobStatus.RUNNING] >= state.settings.queue_max:
            reasons.append("the queue is full")
        store_failure = recent_store_failure(app, state.store)
        if store_failure:
            reasons.append(store_failure)
        image_failure = recent_image_write_failure(state.worker.image_write_failure)
        if image_failure:
            reasons.append(image_failure)
        if reasons:
            status = "degraded"
    if not state.worker.alive:
        # Nothing queued would ever run: not a degraded server but a failed one, so that a load balancer
        # routes away and an orchestrator restarts it (accepted jobs are in the store and run after that).
        status = "failed"
        reasons.append("the worker thread has stopped: restart the service; accepted jobs are kept")
    return {
        "status": status,
        "reasons": reasons,
        # The seed's fields, with honest meanings: can this server serve from that source right now?
        "pexels_ok": stock.ready,
        "sdxl_ok": generate.ready,
        "sources": {name.value: {"state": s.state.value, "detail": s.detail} for name, s in statuses.items()},
        # Behind pexels_ok: quota (limit, remaining, reset_at, blocked_until), last_error, cache and counters.
        "pexels": {"configured": stock.state is not SourceState.NOT_CONFIGURED, **stock.info},
        "device": details.get("device"),
        "plan": details.get("plan"),
        "models": {
            "base": details.get("base_model"),
            "refiner": details.get("refiner_model"),
            "refiner_status": details.get("refiner"),
        },
        "queue": {
            "depth": counts[JobStatus.QUEUED],
            "running": counts[JobStatus.RUNNING],
            "max": state.settings.queue_max,
        },
        "speed_levers": details.get("speed_levers", []),
        # Seconds: model loading, warm-up (compilation), and from process start to ready.
        "startup": details.get("startup", {}),
        "auth": bool(state.settings.api_key_list()),
    }


STORE_FAILURE_SHOWN_S = 60.0  # how long health reports a failed write (the job store, a job's images)


def recent_store_failure(app: FastAPI, store: JobStore) -> str | None:
    """A write to the job store that failed lately (a full disk, a lock held by another program), the API's or
    the worker's (the store records its own: the worker's failed writes left health "ready" while no job could
    end): submits get 503 meanwhile, so health says "degraded" rather than "ready" to a load balancer, for a
    minute after, or until a write succeeds (the store's last_write_at): health said "new jobs get 503" while
    they were accepted."""
    said: list[tuple[float, str]] = [
        failure
        for failure in (getattr(app.state, "store_failure", None), store.last_write_failure)
        if failure is not None
    ]
    failure = max(said, default=None)
    if failure is not None and store.last_write_at is not None and store.last_write_at > failure[0]:
        return None
    return _recent(
        failure,
        "the job store could not be written {ago}s ago ({error}); until it can, new jobs get 503 and finished "
        "jobs wait to be recorded",
    )


def recent_image_write_failure(failure: tuple[float, str] | None) -> str | None:
    """A job's images that the data dir refused lately (a full disk): the job runs again, or fails as
    storage_error once its attempts are used, so health says "degraded" for a minute after."""
    return _recent(
        failure,
        "images could not be written to the data dir {ago}s ago ({error}); their jobs run again, or fail as "
        "storage_error once their attempts are used",
    )


def _recent(failure: tuple[float, str] | None, reason: str) -> str | None:
    """`reason` filled in for a failure (time.monotonic() when, its error) of the last STORE_FAILURE_SHOWN_S."""
    if failure is None:
        return None
    failed_at, error = failure
    ago = time.monotonic() - failed_at
    return None if ago > STORE_FAILURE_SHOWN_S else reason.format(ago=f"{ago:.0f}", error=error)


# What health tells a caller without a key when keys are set: enough for a load balancer and the seed's
# clients, nothing about the host (model paths, load errors, device, Pexels details).
PUBLIC_FIELDS = ("status", "pexels_ok", "sdxl_ok", "queue", "auth")


def report_for(request: Request) -> dict[str, Any]:
    report = health_report(request.app)
    if holds_api_key(request, request.app.state.settings):
        return report
    public = {name: report[name] for name in PUBLIC_FIELDS}
    public["details"] = "send the API key (Authorization: Bearer <key>) for the full report"
    return public


@router.get("/v1/health")
@router.head("/v1/health", include_in_schema=False)  # the same, headers only (the server drops HEAD's body)
def health(request: Request) -> JSONResponse:
    """The same report; 200 when ready or degraded, 503 while starting or failed (for load balancers).
    With API keys set, a caller without one gets the status fields only."""
    report = report_for(request)
    return JSONResponse(report, status_code=200 if report["status"] in ("ready", "degraded") else 503)


HEALTH_ALLOW = "GET, HEAD, OPTIONS"


@router.options("/v1/health", include_in_schema=False)
def health_options() -> Response:
    """OPTIONS on a health route (this one and /api/media/health): 200 and the methods it takes, for checks
    such as HAProxy's `option httpchk OPTIONS`. Not CORS: no Access-Control-* headers."""
    return Response(status_code=200, headers={"Allow": HEALTH_ALLOW})
