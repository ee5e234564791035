"""How many calls of compiled modules ran uncompiled after the service's warm-up, by kind of call.

engine/size_routing.py counts them (a shape the warm-up did not compile runs the module itself rather than
compile on a request); /metrics exports them (jobs/metrics.py) so an operator sees when requests miss the
warm-up's graphs and run slower. Kept apart from the engine: the metrics import it without importing torch.
"""

from __future__ import annotations

import threading
from collections import Counter

_COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()


def count_uncompiled_call(kind: str) -> None:
    with _LOCK:
        _COUNTS[kind] += 1


def uncompiled_calls() -> dict[str, int]:
    with _LOCK:
        return dict(_COUNTS)
