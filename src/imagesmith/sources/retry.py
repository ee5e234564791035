"""Backoff delays shared by the API client and the downloader: exponential, capped, with jitter.

Jitter keeps several workers that failed together from retrying together ("equal jitter": half the delay is
fixed, half random, so a retry never comes immediately).
"""

from __future__ import annotations

import random

MAX_BACKOFF_S = 8.0


def backoff_delay(
    retry: int, base_s: float, cap_s: float = MAX_BACKOFF_S, rng: random.Random | None = None
) -> float:
    """Delay before retry number `retry` (0 for the first retry)."""
    ceiling = min(cap_s, base_s * (2**retry))
    draw = (rng or random).random()
    return ceiling / 2 + ceiling / 2 * draw


def is_retryable_status(status: int) -> bool:
    return 500 <= status <= 599
