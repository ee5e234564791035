"""The one place that turns exceptions into HTTP: every error is JSON {"error": {code, message, field}}.

Bad input is a 4xx with the field to blame; only a bug is a 500, and it says nothing about internals.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagesmith.jobs.service import (
    JobNotFound,
    LimitExceeded,
    ServiceError,
    SourcesStarting,
    SourcesUnavailable,
    StockNotConfigured,
)
from imagesmith.jobs.store import IdempotencyConflict, QueueFull

log = logging.getLogger(__name__)

_FIELD_TAG = re.compile(r"^\[(\w+)\] (.*)$", re.DOTALL)
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
}
QUEUE_FULL_RETRY_AFTER_S = 5


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers
        self.extra = extra  # more members of the error object, e.g. a source failure's reason and attempts


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    details: list[dict[str, str]] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "field": field, **(extra or {})}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def validation_details(items: Sequence[Any]) -> list[dict[str, str]]:
    """pydantic errors as [{field, message}]: locations joined with dots, without FastAPI's "body" prefix;
    checks spanning several fields name theirs as "[field] message" (see schemas.py)."""
    out = []
    for item in items:
        loc = [str(part) for part in item.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        # Skip the model-class segment pydantic adds for nested model validators.
        field = ".".join(part for part in loc if part not in ("generation",)) or "request"
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        tagged = _FIELD_TAG.match(message)
        if tagged:
            field, message = tagged.group(1), tagged.group(2)
        out.append({"field": field, "message": message})
    return out


def _invalid(items: Sequence[Any]) -> JSONResponse:
    details = validation_details(items)
    first = details[0] if details else {"field": "request", "message": "invalid request"}
    return error_response(422, "invalid_request", first["message"], first["field"], details=details)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(
            error.status, error.code, error.message, error.field, error.headers, extra=error.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _invalid(error.errors())

    @app.exception_handler(ValidationError)
    async def _model_invalid(_: Request, error: ValidationError) -> JSONResponse:
        return _invalid(error.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(error.status_code, "http_error")
        return error_response(
            error.status_code, code, str(error.detail), headers=getattr(error, "headers", None)
        )

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, error: QueueFull) -> JSONResponse:
        return error_response(
            429, "queue_full", f"{error}; retry later", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}
        )

    @app.exception_handler(IdempotencyConflict)
    async def _idempotency(_: Request, error: IdempotencyConflict) -> JSONResponse:
        return error_response(409, "idempotency_conflict", str(error), "Idempotency-Key")

    @app.exception_handler(ServiceError)
    async def _service(_: Request, error: ServiceError) -> JSONResponse:
        status = {
            LimitExceeded: 422,
            JobNotFound: 404,
            StockNotConfigured: 422,  # the request asks for what this server does not offer
            SourcesStarting: 503,
            SourcesUnavailable: 503,
        }.get(type(error), 400)
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        return error_response(status, error.code, error.message, error.field, headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "an internal error occurred; see the server log")
