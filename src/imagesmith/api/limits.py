"""Request body size limit, as ASGI middleware so an oversized body is refused before it is read whole."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagesmith.api.errors import render_error


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
                if declared > self.max_bytes:
                    # In the dialect of the route (OpenAI, A1111 or ours), like every other error.
                    refusal = render_error(Request(scope), 413, "body_too_large", message)
                    await refusal(scope, receive, send)
                    return
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
