"""One way for tests to clear dynamo's caches."""

from __future__ import annotations

import torch


def reset_dynamo() -> None:
    """torch._dynamo.reset(), once more if it trips over its own backend cache: run right after
    test_speed_levers.py (not the suite's order), torch 2.13's reset raised "dictionary changed size during
    iteration" while resetting a backend that registered another. The second reset finds the cache settled."""
    try:
        torch._dynamo.reset()
    except RuntimeError:
        torch._dynamo.reset()
