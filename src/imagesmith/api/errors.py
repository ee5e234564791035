"""The one place that turns exceptions into HTTP.

Every error is JSON {"error": {code, message, field}}, except on the compatibility routes, which speak their
clients' dialect: the OpenAI Images API gets OpenAI's error object {"error": {message, type, param, code}} (and
400 where the service says 422), the AUTOMATIC1111 API gets A1111's {error, detail, body, errors}. The handlers
below decide what went wrong; `render_error` decides how it is written for the route family asked.

Bad input is a 4xx with the field to blame; only a bug is a 500, and it says nothing about internals.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from imagesmith.jobs.service import (
    InvalidGeneration,
    InvalidIdempotencyKey,
    JobNotFound,
    LimitExceeded,
    ServiceError,
    ShuttingDown,
    SourcesStarting,
    SourcesUnavailable,
    StockNotConfigured,
    too_long_text,
    too_many_images,
)
from imagesmith.jobs.store import STORE_TRANSIENT_CODES, IdempotencyConflict, QueueFull, sqlite_result_code
from imagesmith.schemas import blame

log = logging.getLogger(__name__)

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
STORAGE_RETRY_AFTER_S = 10


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


class ErrorFamily(StrEnum):
    SERVICE = "service"
    OPENAI = "openai"  # /v1/images/generations and its siblings
    A1111 = "a1111"  # /sdapi/v1/...


# The OpenAI Images API's POST-only routes, under the prefix of our GET /v1/images/{name}.
OPENAI_IMAGE_ROUTES = ("generations", "edits", "variations")
# Path prefixes of the compatibility routes; everything else is the service's own API.
_FAMILY_PREFIXES = (
    ("/v1/images/generations", ErrorFamily.OPENAI),
    ("/v1/images/edits", ErrorFamily.OPENAI),
    ("/v1/images/variations", ErrorFamily.OPENAI),
    ("/v1/models", ErrorFamily.OPENAI),
    ("/sdapi/", ErrorFamily.A1111),
)
_OPENAI_TYPES = {401: "invalid_request_error", 429: "rate_limit_error"}
# Our codes as OpenAI's: a bad parameter is "invalid_value" whether the schema or the mapping refused it.
_OPENAI_CODES = {
    "unauthorized": "invalid_api_key",
    "queue_full": "rate_limit_exceeded",
    "invalid_request": "invalid_value",
}


def error_family(request: Request) -> ErrorFamily:
    path = request.url.path
    for prefix, family in _FAMILY_PREFIXES:
        if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return family
    return ErrorFamily.SERVICE


def openai_error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """OpenAI's error object. Its API answers bad parameters with 400, so the service's 422s become 400s."""
    status = 400 if status == 422 else status
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"message": message, "type": kind, "param": param, "code": _OPENAI_CODES.get(code, code)}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def a1111_error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A1111's shape (its api middleware writes {error, detail, body, errors}); `field` added for people."""
    body = {"error": code, "detail": message, "body": "", "errors": message, "field": field}
    return JSONResponse(body, status_code=status, headers=headers)


def render_error(
    request: Request,
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    details: list[dict[str, str]] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """One error, written in the dialect of the route family the request went to."""
    family = error_family(request)
    if family is ErrorFamily.OPENAI:
        return openai_error_response(status, code, message, field, headers)
    if family is ErrorFamily.A1111:
        return a1111_error_response(status, code, message, field, headers)
    return error_response(status, code, message, field, headers, details, extra)


# What FastAPI says when it cannot read a body at all (bytes that are not UTF-8), and the errors pydantic gives
# for a body that is there but is not a JSON object (empty, a form, text/plain, a JSON list): each is bad input
# like a wrong field, so each is the same 422 naming the body, with the fix.
BODY_UNREADABLE = "There was an error parsing the body"
BODY_NOT_AN_OBJECT_ERRORS = ("model_attributes_type", "dict_type", "missing")
SEND_A_JSON_OBJECT = (
    'send a JSON object encoded as UTF-8, with Content-Type: application/json, e.g. {"prompt": "..."}'
)


def not_a_json_object(content_type: str) -> str:
    """Why a body that is no JSON object was refused. Sent as something else, it says what came: curl's -d sends
    a JSON object as a form (application/x-www-form-urlencoded), and "not a JSON object" left that unsaid."""
    sent = content_type.split(";")[0].strip().lower()
    if not sent or sent == "application/json" or sent.endswith("+json"):
        return f"the request body is not a JSON object; {SEND_A_JSON_OBJECT}"
    return f"the request body came as Content-Type: {sent}, not JSON; {SEND_A_JSON_OBJECT}"


def validation_details(items: Sequence[Any], content_type: str = "") -> list[dict[str, str]]:
    """pydantic errors as [{field, message}]: locations joined with dots, without FastAPI's "body" prefix;
    checks spanning several fields name theirs as "[field] message" (see schemas.py). `content_type`: the
    request's, said where the body is not a JSON object."""
    out = []
    for item in items:
        loc = [str(part) for part in item.get("loc", ())]
        if loc == ["body"] and item.get("type") in BODY_NOT_AN_OBJECT_ERRORS:
            out.append({"field": "body", "message": not_a_json_object(content_type)})
            continue
        if item.get("type") == "json_invalid":
            # Its location is a character offset into the body, not a field: said in the message, with the fix.
            position = loc[1] if len(loc) > 1 and loc[0] == "body" else None
            reason = (item.get("ctx") or {}).get("error")
            where = f" at character {position}" if position is not None else ""
            message = str(item.get("msg", "invalid JSON"))
            if reason:
                message = f"the request body is not valid JSON: {reason}{where}; {SEND_A_JSON_OBJECT}"
            out.append({"field": "body", "message": message})
            continue
        elif loc and loc[0] == "body":
            loc = loc[1:]
        elif loc and loc[0] in ("query", "path", "header"):
            # A repeated parameter (`?status=a&status=b`) is a list to pydantic, its values' places indices:
            # the client wrote "status" twice, so the field is "status", not "status.1".
            loc = [part for part in loc[1:] if not part.isdigit()]
        # Skip the model-class segment pydantic adds for nested model validators.
        field, message = blame(
            ".".join(part for part in loc if part not in ("generation",)) or "request",
            str(item.get("msg", "invalid value")),
        )
        meant = _FIELD_MEANT.get(loc[-1]) if loc and item.get("type") == "extra_forbidden" else None
        if meant:
            message = f"{field} is not a field of this request; did you mean {meant}?"
        out.append({"field": field, "message": message})
    return out


# Unknown fields people send for ours: the CLI's option names (`--steps`), other tools' names. Said with the field
# to use, rather than pydantic's bare "Extra inputs are not permitted" (a black-box session sent `steps`).
_FIELD_MEANT = {
    "steps": "num_inference_steps",
    "negative": "negative_prompt",
    "guidance": "guidance_scale",
    "cfg_scale": "guidance_scale",
    "mode": "refine_mode",
    "format": "output_format",
    "num_outputs": "num_images",
}


def _servers_limits(request: Request, items: Sequence[Any]) -> list[Any]:
    """A num_images, prompt or negative_prompt past the schema's ceiling (MAX_NUM_IMAGES, MAX_PROMPT_CHARS)
    answered with the server's own limit, as one past that limit is: pydantic's "less than or equal to 32" or "at
    most 2000 characters" named a number this server may never allow, under another error code."""
    settings = getattr(request.app.state, "settings", None)
    if settings is None:
        return list(items)
    return [_servers_limit(item, settings) for item in items]


def _servers_limit(item: Any, settings: Any) -> Any:
    field = tuple(item.get("loc", ()))[-1:]
    if item.get("type") == "less_than_equal" and field == ("num_images",):
        message = too_many_images(item.get("input"), settings.max_images_per_request)
    elif item.get("type") == "string_too_long" and field in (("prompt",), ("negative_prompt",)):
        message = too_long_text(field[0], len(str(item.get("input", ""))), settings.max_prompt_chars)
    else:
        return item
    return {**item, "type": SERVERS_LIMIT, "msg": message}


# The type of an error `_servers_limits` rewrote: answered with the code the service's own check gives
# (num_images 5 on a server of 4 said "limit_exceeded", num_images 10000 said "invalid_request").
SERVERS_LIMIT = "servers_limit"


def _key_refused_first(request: Request) -> JSONResponse | None:
    """The 401 a route behind the API key gives a caller without one, whatever the body. FastAPI reads and
    validates the body before it runs a route's dependencies, so malformed JSON got a 422 that described the
    route's fields to a caller without a key. None when the route needs no key or the caller holds one."""
    from imagesmith.api.deps import require_api_key, require_api_key_for_images  # deps imports this module

    checks = (require_api_key, require_api_key_for_images)
    dependant = getattr(request.scope.get("route"), "dependant", None)
    pending, found = ([dependant] if dependant is not None else []), []
    while pending:
        node = pending.pop()
        if node.call in checks:
            found.append(node.call)
        pending.extend(node.dependencies)
    try:
        for check in found:
            check(request, request.app.state.settings)
    except ApiError as error:
        return render_error(request, error.status, error.code, error.message, error.field, error.headers)
    return None


def _invalid(request: Request, items: Sequence[Any]) -> JSONResponse:
    refused = _key_refused_first(request)
    if refused is not None:
        return refused
    items = _servers_limits(request, items)
    details = validation_details(items, request.headers.get("content-type", ""))
    first = details[0] if details else {"field": "request", "message": "invalid request"}
    message = first["message"]
    if error_family(request) is not ErrorFamily.SERVICE and first["field"] != "request":
        message = f"{first['field']}: {message}"  # these dialects have no separate list of details
    code = "limit_exceeded" if items and items[0].get("type") == SERVERS_LIMIT else "invalid_request"
    return render_error(request, 422, code, message, first["field"], details=details)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Listed in a 405's Allow header (RFC 9110: what the resource supports) but not in its message, which names
# what a client means to call.
_QUIET_METHODS = ("HEAD", "OPTIONS")


def methods_for(request: Request) -> list[str]:
    """Every method some route serves at this request's path, each asked of the app's routes as a dispatch
    would. Starlette's 405 names one route's methods only: GET /v1/jobs and POST /v1/jobs are two routes, and
    DELETE /v1/jobs said "Allow: POST"."""
    methods = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.routes
        )
    ]
    if request.url.path.removeprefix("/v1/images/") in OPENAI_IMAGE_ROUTES:
        # GET /v1/images/{name} matches these paths too, but answers them with a 405 that allows POST alone.
        methods = [method for method in methods if method not in ("GET", "HEAD")]
    return methods


def unknown_path_message(request: Request) -> str:
    """A 404 for a path no route serves, naming the routes of its family: an AUTOMATIC1111 client calling
    /sdapi/v1/img2img learns which A1111 routes there are, where it heard a bare "Not Found"."""
    path = request.url.path
    if error_family(request) is ErrorFamily.A1111:
        paths = request.app.openapi().get("paths", {})
        served = [
            f"{method.upper()} {route}"
            for route, operations in sorted(paths.items())
            if route.startswith("/sdapi/")
            for method in operations
        ]
        return f"{path} is not served here; the AUTOMATIC1111 routes served are: {', '.join(served)}"
    return f"no route {path}; the API's routes are listed at /docs"


def _internal_error(request: Request) -> JSONResponse:
    """A bug's answer: a 500 that says nothing about internals (the log has the traceback)."""
    return render_error(request, 500, "internal_error", "an internal error occurred; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return render_error(
            request, error.status, error.code, error.message, error.field, error.headers, extra=error.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _invalid(request, error.errors())

    @app.exception_handler(ValidationError)
    async def _model_invalid(request: Request, error: ValidationError) -> JSONResponse:
        return _invalid(request, error.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400 and error.detail == BODY_UNREADABLE:
            unreadable = {
                "type": "json_invalid",
                # json.loads failed other than on syntax: bytes that are not UTF-8, a number of more digits
                # than Python reads (4300), nesting deeper than its recursion limit.
                "msg": "the request body could not be read as JSON (it is not UTF-8, or holds a number of over "
                f"4300 digits or nesting too deep); {SEND_A_JSON_OBJECT}",
            }
            return _invalid(request, [unreadable])
        code = _STATUS_CODES.get(error.status_code, "http_error")
        message, headers = str(error.detail), getattr(error, "headers", None)
        if error.status_code == 405 and message == "Method Not Allowed":
            allowed = methods_for(request)
            if allowed:
                said = [method for method in allowed if method not in _QUIET_METHODS] or allowed
                message = f"{request.url.path} takes {' or '.join(said)}, not {request.method}"
                headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        elif error.status_code == 404 and message == "Not Found":
            message = unknown_path_message(request)
        return render_error(request, error.status_code, code, message, headers=headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, error: QueueFull) -> JSONResponse:
        return render_error(
            request,
            429,
            "queue_full",
            f"{error}; retry later",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)},
        )

    @app.exception_handler(IdempotencyConflict)
    async def _idempotency(request: Request, error: IdempotencyConflict) -> JSONResponse:
        return render_error(request, 409, "idempotency_conflict", str(error), "Idempotency-Key")

    @app.exception_handler(ServiceError)
    async def _service(request: Request, error: ServiceError) -> JSONResponse:
        status = {
            LimitExceeded: 422,
            InvalidGeneration: 422,
            InvalidIdempotencyKey: 422,
            JobNotFound: 404,
            StockNotConfigured: 422,  # the request asks for what this server does not offer
            SourcesStarting: 503,
            ShuttingDown: 503,
            SourcesUnavailable: 503,
        }.get(type(error), 400)
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        return render_error(request, status, error.code, error.message, error.field, headers)

    @app.exception_handler(sqlite3.OperationalError)
    async def _store_unwritable(request: Request, error: sqlite3.OperationalError) -> JSONResponse:
        # A full disk, or the database locked by another program past the busy timeout: the server is fine and
        # the request was not taken (its transaction did not commit), so a retry later is the answer, not a 500.
        code = sqlite_result_code(error)
        if code is not None and code not in STORE_TRANSIENT_CODES:  # SQL or schema: a bug, not the disk
            log.error("unhandled store error", exc_info=error)
            return _internal_error(request)
        log.error("the job store failed: %s", error)
        request.app.state.store_failure = (time.monotonic(), str(error))  # health says so for a while
        return render_error(
            request,
            503,
            "storage_unavailable",
            f"the job store cannot be used right now ({error}); nothing was changed, retry later",
            headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _internal_error(request)
