"""Retries shared by the API client and the downloader: one loop, backoff exponential, capped, with jitter;
and the capped body read they share.

Jitter keeps several workers that failed together from retrying together ("equal jitter": half the delay is
fixed, half random, so a retry never comes immediately).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from imagesmith.sources.errors import PexelsUnavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BACKOFF_S = 8.0

# Transport failures worth another try: the network or the far end failed. The other TransportErrors are about
# our own request (LocalProtocolError: an illegal header value such as a key with a newline; UnsupportedProtocol:
# a URL without http(s)://) or a proxy, and a retry would fail the same way.
RETRYABLE_TRANSPORT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def backoff_delay(
    retry: int, base_s: float, cap_s: float = MAX_BACKOFF_S, rng: random.Random | None = None
) -> float:
    """Delay before retry number `retry` (0 for the first retry)."""
    ceiling = min(cap_s, base_s * (2**retry))
    draw = (rng or random).random()
    return ceiling / 2 + ceiling / 2 * draw


def is_retryable_status(status: int) -> bool:
    return 500 <= status <= 599


async def read_at_most(response: httpx.Response, max_bytes: int) -> bytes | None:
    """The body, decoded, or None as soon as it passes max_bytes: reading stops there, so a body that inflates
    (gzip) or never ends costs at most max_bytes of memory."""
    chunks, total = [], 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class Retryable(Exception):
    """A failure worth another try (a network error, a 5xx); the message says what happened."""


async def within_deadline(call: Callable[[], Awaitable[T]], timeout_s: float, what: str) -> T:
    """`call()` with a deadline on the whole of it, its network failures turned into Retryable. httpx's own
    timeout bounds each read only: a host that drips a byte at a time never trips it and would hold the
    worker for as long as it likes. `what` says what was being done ("downloading <url>")."""
    try:
        async with asyncio.timeout(timeout_s):
            return await call()
    except TimeoutError:
        raise Retryable(f"{what}: took over {timeout_s:g}s to answer") from None
    except RETRYABLE_TRANSPORT_ERRORS as error:
        raise Retryable(f"{type(error).__name__} {what}") from None


async def with_retries(
    once: Callable[[], Awaitable[T]],
    *,
    max_retries: int,
    backoff_s: float,
    sleep: Callable[[float], Awaitable[None]],
) -> T:
    """`once()`, tried again after a backoff pause each time it raises Retryable, at most `max_retries` more
    times; then PexelsUnavailable("<what happened> after N tries"). Any other error passes straight through."""
    for attempt in range(max_retries + 1):
        try:
            return await once()
        except Retryable as error:
            if attempt == max_retries:
                raise PexelsUnavailable(f"{error} after {attempt + 1} tries") from None
            delay = backoff_delay(attempt, backoff_s)
            logger.warning("%s; retry %d of %d in %.2fs", error, attempt + 1, max_retries, delay)
            await sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover
