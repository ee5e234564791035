"""docs/service.md lists the server's Prometheus metrics: every family /metrics exports is in that list, and
every metric listed is exported (with a Pexels key, so the Pexels families are there too). In-process app with
the session's tiny engine; the Pexels stand-in answers on 127.0.0.1."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from pexels_standin import API_KEY, StandIn

SERVICE_MD = Path(__file__).resolve().parents[2] / "docs" / "service.md"


def documented_metrics() -> set[str]:
    row = next(line for line in SERVICE_MD.read_text().splitlines() if line.startswith("| `GET /metrics`"))
    return set(re.findall(r"`(imagesmith_[a-z_]+)", row))


def test_every_metric_exported_is_documented_and_every_one_documented_is_exported(
    app_client: Callable[..., TestClient], standin: StandIn
) -> None:
    with app_client(
        pexels_api_key=API_KEY,
        pexels_api_base_url=f"{standin.base_url}/v1",
        pexels_allowed_hosts=[standin.base_url],
    ) as client:
        text = client.get("/metrics").text
    families = set(re.findall(r"(?m)^# TYPE (imagesmith_\w+) ", text))
    # prometheus_client adds a "<name>_created" gauge beside each histogram and counter: not ours to document.
    exported = {name for name in families if not name.endswith("_created")}
    assert exported == documented_metrics()
