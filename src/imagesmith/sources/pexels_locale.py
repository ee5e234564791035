"""The shape of a Pexels search locale, checked where one comes in: a request's `locale` and the
IMAGESMITH_PEXELS_LOCALE setting (which was sent to Pexels as typed, "german" included). No heavy imports: the
settings check it when they load."""

from __future__ import annotations

import re

_LOCALE = re.compile(r"[a-z]{2}-[A-Z]{2}")  # Pexels' locales are all this shape (en-US, pt-BR, zh-TW, ...)


def checked_locale(value: str) -> str:
    """`value` if it is shaped as a Pexels locale, else ValueError saying how to write one."""
    if _LOCALE.fullmatch(value):
        return value
    raise ValueError(f"{value!r} is not a locale: write it as language-REGION, e.g. en-US, de-DE or pt-BR")
