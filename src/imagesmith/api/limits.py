"""Request body size limit, as ASGI middleware so an oversized body is refused before it is read whole.

Refused early, on its declared Content-Length, only when the route that will answer reads a body: a request for a
path no route serves (404), with a method its path does not take (405), or to a route that takes no body (the
OpenAI edits and variations routes answer 404 "not_supported") gets that route's own answer, which is what its
caller needs to hear. A 413 there told the caller to raise the limit, and only then that the endpoint is not
served. Whatever passes on still cannot read more than the limit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagesmith.api.errors import render_error


def _routes_in_order(routes: Sequence[BaseRoute]) -> Iterator[Any]:
    """The app's routes, one by one in the order its router tries them (each with matches(), and body_field
    where FastAPI's). Newer FastAPI keeps an included router as one entry of app.routes and lists its routes
    through iter_route_contexts (each as it was included, prefix and dependencies added); older versions copied
    them into app.routes themselves."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # an older FastAPI: the routes are there already
        yield from routes
        return
    yield from iter_route_contexts(routes)


def reads_a_body(scope: Scope) -> bool:
    """Whether the route that answers this request reads its body, decided as the router dispatches: the first
    route that matches path and method answers it; with none, the router answers 404 or 405 without reading the
    body. True wherever unsure (no app in the scope, a route that is not a FastAPI APIRoute)."""
    routes: Sequence[BaseRoute] | None = getattr(scope.get("app"), "routes", None)
    if routes is None:
        return True
    for route in _routes_in_order(routes):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            # body_field is None where neither the route nor a dependency of it (its router's included) takes
            # a body, JSON or form.
            return not (
                isinstance(getattr(route, "original_route", route), APIRoute) and route.body_field is None
            )
    # No match at all (404) or the path under another method (405). FastAPI's low-priority routes, tried only
    # then, are not looked at: whatever goes on is still held to the limit by the guard, as it reads.
    return False


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes and reads_a_body(scope):
                    # In the dialect of the route (OpenAI, A1111 or ours), like every other error.
                    refusal = render_error(Request(scope), 413, "body_too_large", message)
                    await refusal(scope, receive, send)
                    return
                # Otherwise (a 404, a 405, a route that takes no body) the app answers below, unread, with the
                # guard on should anything read.
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException, not our ApiError: FastAPI turns any other error raised while it reads
                    # the body into a 400 "error parsing the body". errors.py maps 413 to body_too_large.
                    raise HTTPException(413, message)
            return received

        await self.app(scope, limited_receive, send)
