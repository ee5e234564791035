"""GET /metrics in Prometheus' text format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imagesmith.api.deps import Authorized

router = APIRouter(tags=["operations"], dependencies=[Authorized])


@router.get("/metrics", response_class=Response)
@router.head("/metrics", response_class=Response, include_in_schema=False)  # the same, headers only
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
