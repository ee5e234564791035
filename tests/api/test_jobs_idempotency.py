"""An Idempotency-Key replay after a restart: it answers with the job it made, whatever the sources say now and
whatever defaults the server now fills in. In-process apps on one data dir (a restart), tiny engine."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from polling import wait_for

from imagesmith.api import create_app
from imagesmith.config import ModelPreset, Settings

BODY = {"prompt": "a quiet harbour", "num_inference_steps": 4, "seed": 7}  # no size: the server's default


def app(tmp_path: Path, engine_factory: Any, default_width: int = 64) -> TestClient:
    settings = Settings(
        model=ModelPreset.TINY,
        device="cpu",
        data_dir=tmp_path / "data",
        default_width=default_width,
        default_height=64,
        stock_default_size="",
        warmup=False,
    )
    return TestClient(create_app(settings, engine_factory))


def ready(client: TestClient) -> None:
    wait_for(lambda: client.get("/v1/health").json().get("status") != "starting")


def first_job(tmp_path: Path, tiny_engine: Any, key: str) -> str:
    """Submit BODY under `key` and let it finish; then the app stops (a restart follows)."""
    with app(tmp_path, lambda _: tiny_engine) as client:
        ready(client)
        created = client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key})
        assert created.status_code == 202, created.text
        job_id: str = created.json()["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded", timeout=60)
    return job_id


def test_a_replay_while_the_models_load_answers_with_its_job(tmp_path: Path, tiny_engine: Any) -> None:
    job_id = first_job(tmp_path, tiny_engine, "restart-1")
    loaded = threading.Event()

    def slow(_: Any) -> Any:
        loaded.wait(30)
        return tiny_engine

    try:
        with app(tmp_path, slow) as client:
            replay = client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "restart-1"})
            assert replay.status_code == 202, replay.text
            assert replay.json()["id"] == job_id and replay.json()["status"] == "succeeded"
            assert replay.headers["Idempotent-Replayed"] == "true"
            # A new request still waits for the models: only the replay skips admission.
            fresh = client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "restart-2"})
            assert fresh.status_code == 503 and fresh.json()["error"]["code"] == "starting"
            loaded.set()
    finally:
        loaded.set()


def test_a_replay_after_the_models_failed_to_load_answers_with_its_job(
    tmp_path: Path, tiny_engine: Any
) -> None:
    job_id = first_job(tmp_path, tiny_engine, "restart-3")

    def broken(_: Any) -> Any:
        raise RuntimeError("no GPU today")

    with app(tmp_path, broken) as client:
        ready(client)
        replay = client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "restart-3"})
        assert replay.status_code == 202, replay.text
        assert replay.json()["id"] == job_id


def test_a_replay_after_the_default_size_changed_is_no_conflict(tmp_path: Path, tiny_engine: Any) -> None:
    job_id = first_job(tmp_path, tiny_engine, "restart-4")
    with app(tmp_path, lambda _: tiny_engine, default_width=128) as client:
        ready(client)
        replay = client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "restart-4"})
        assert replay.status_code == 202, replay.text
        assert replay.json()["id"] == job_id
        assert replay.json()["request"]["generation"]["width"] == 64  # the job as it was made
        # A different body under the same key is still a conflict.
        other = client.post("/v1/jobs", json={**BODY, "seed": 8}, headers={"Idempotency-Key": "restart-4"})
        assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
        # The new default applies to new jobs.
        fresh = client.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "restart-5"})
        assert fresh.status_code == 202 and fresh.json()["request"]["generation"]["width"] == 128
