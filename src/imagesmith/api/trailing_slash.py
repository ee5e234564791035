"""`/v1/jobs/` is `/v1/jobs`: a path's trailing slashes are dropped before routing.

Why: Starlette answered a trailing slash with a bare 307 to the path without it, an empty body in no error format.
Clients that do not follow redirects on POST (curl without -L, several HTTP libraries) saw an empty answer and no
job, and the redirect's Location named the server as it saw itself, which behind a proxy is not the client's
address. No route of this API ends in a slash, so dropping it routes the request where the client meant it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class IgnoreTrailingSlash:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
            raw = scope.get("raw_path")
            if isinstance(raw, bytes):
                scope["raw_path"] = raw.rstrip(b"/") or b"/"
        await self.app(scope, receive, send)
