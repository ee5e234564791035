"""Request bodies whose strings are not text: a 422 naming the field, before anything is stored.

JSON may escape half of a UTF-16 surrogate pair on its own ("\\ud800"): valid syntax, and what a JavaScript client
sends when it cuts a string through an emoji and serializes it. Python reads it as a str that cannot be written as
UTF-8. pydantic refuses it only in fields with a length bound (it converts those to count), so a plain `list[str]`
such as `keywords`, or a field the A1111 API accepts and echoes, let it through: the job was stored, and every
response that held it failed to serialize, the submit's own (a 500 for a job that ran) and each later listing of
it, across restarts. A route whose class is `TextCheckedRoute` reads such a body's JSON first and refuses it as
FastAPI refuses other bad fields, so each API family says it in its own dialect (api/errors.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

Location = tuple[str | int, ...]


class TextCheckedRoute(APIRoute):
    """An APIRoute that refuses a JSON body holding a string that is not UTF-8 text, naming where it is."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_text_checked(request: Request) -> Response:
            # Only a route that takes a body: one without (OpenAI's edits and variations, answered "not
            # supported") would read an upload it never uses, and meet the body limit (api/limits.py) doing so.
            if request.method in ("POST", "PUT", "PATCH") and self.body_field is not None:
                # Starlette keeps the bytes on the request: FastAPI's own parse below reads them again.
                problem = not_text_in(await request.body())
                if problem is not None:
                    raise RequestValidationError([problem])
            return await handle(request)

        return handle_text_checked


def not_text_in(body: bytes) -> dict[str, Any] | None:
    """The first string in a JSON body (keys included) that cannot be encoded as UTF-8, as a pydantic-style error
    located in the body; None when there is none, or the body is not JSON (FastAPI says so itself)."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    found = _first_lone_surrogate(parsed, ())
    if found is None:
        return None
    where, text, is_key = found
    position = next(index for index, char in enumerate(text) if 0xD800 <= ord(char) <= 0xDFFF)
    what = "this key" if is_key else "the text"
    return {
        "type": "string_unicode",
        "loc": ("body", *where),
        "msg": (
            f"{what} holds half of a UTF-16 surrogate pair (\\u{ord(text[position]):04x}, at character "
            f"{position}), which is not a character: send the whole character (both halves of the pair), or "
            "leave it out"
        ),
        "input": _escaped(text),
    }


def _escaped(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _first_lone_surrogate(value: object, where: Location) -> tuple[Location, str, bool] | None:
    if isinstance(value, str):
        return None if _is_text(value) else (where, value, False)
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_lone_surrogate(item, (*where, index))
            if found is not None:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            if not _is_text(key):  # located at the key itself, written with escapes so the location is text
                return ((*where, _escaped(key)), key, True)
            found = _first_lone_surrogate(item, (*where, key))
            if found is not None:
                return found
    return None


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
