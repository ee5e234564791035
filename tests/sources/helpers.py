"""Test helpers shared by the stock-photo tests: a fake clock and settings pointing at the stand-in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imagesmith.config import Settings

from .standin import API_KEY, StandIn


class FakeClock:
    """UNIX seconds that only move when a test says so: quota resets and cache expiry without waiting."""

    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(standin: StandIn, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "pexels_api_key": API_KEY,
        "pexels_api_base_url": f"{standin.base_url}/v1",
        "pexels_allowed_hosts": [standin.base_url],
        "pexels_timeout_s": 0.5,
        "pexels_download_timeout_s": 0.5,
        "pexels_max_retries": 2,
        "pexels_retry_backoff_s": 0.001,
        "pexels_max_download_bytes": 2_000_000,
        "pexels_quota_backoff_s": 600.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)
