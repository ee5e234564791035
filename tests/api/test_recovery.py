"""Crash safety: kill -9 the server with one job running and others queued; a restart finishes every one, once."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from polling import wait_for
from service_helpers import ServerProcess, sse

SLOW = {"prompt": "interrupted", "width": 96, "height": 96, "num_inference_steps": 150, "seed": 1}


def test_kill_9_with_jobs_queued_and_running(server_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first: ServerProcess = server_factory(data_dir).start()
    with first.client() as client:
        running = client.post("/v1/jobs", json=SLOW).json()["id"]
        # No seed sent: the one drawn for it is stored with the job at once, so its run after the restart makes
        # the image the first run was making (drawn at run time, the rerun made another).
        unseeded = client.post("/v1/jobs", json={"prompt": "no seed", "num_inference_steps": 20}).json()
        drawn = unseeded["request"]["generation"]["seed"]
        assert isinstance(drawn, int)
        queued = [
            client.post(
                "/v1/jobs", json={"prompt": f"queued {i}", "num_inference_steps": 20, "seed": i}
            ).json()["id"]
            for i in range(3)
        ]
        wait_for(lambda: (client.get(f"/v1/jobs/{running}").json().get("step") or 0) >= 2)
        assert all(client.get(f"/v1/jobs/{job}").json()["status"] == "queued" for job in queued)
    first.kill()

    second: ServerProcess = server_factory(data_dir).start()
    with second.client() as client:
        jobs = {job: wait_for(lambda job=job: _done(client, job), timeout=90) for job in [running, *queued]}
        for job in jobs.values():
            assert job["status"] == "succeeded", job
            image = httpx.get(second.url + job["result"]["images"][0]["url"])
            assert image.status_code == 200
        unseeded_job = wait_for(lambda: _done(client, unseeded["id"]), timeout=90)
        assert unseeded_job["result"]["metadata"]["seeds"] == [drawn]
    # The interrupted job ran twice (its first run never finished); every other job exactly once.
    assert jobs[running]["attempts"] == 2
    assert all(jobs[job]["attempts"] == 1 for job in queued)
    # FIFO survived the crash: the interrupted job ran again before the queued ones started. Its end may come after
    # their start (its image is stored while the next pass runs: the three queued jobs share one pass), but passes
    # are finished in the order they ended (jobs/finishing.py), so it ended before any of them.
    assert jobs[running]["started_at"] < min(jobs[job]["started_at"] for job in queued)
    assert jobs[running]["finished_at"] <= min(jobs[job]["finished_at"] for job in queued)
    # One row per job, each with one result.
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
    assert rows == [("succeeded", 5)]


def test_a_client_resuming_after_a_crash_gets_the_reruns_events_from_its_start(
    server_factory: Any, tmp_path: Path
) -> None:
    """Event ids counted from 1 in each process: the Last-Event-ID a client kept from before the crash was above
    the rerun's ids, so its stream skipped the rerun's status and first steps as already seen."""
    data_dir = tmp_path / "data"
    slow = {"prompt": "a slow fox", "width": 128, "height": 128, "num_inference_steps": 150, "seed": 5}
    first: ServerProcess = server_factory(data_dir).start()
    with first.client() as client:
        job = client.post("/v1/jobs", json=slow).json()["id"]
        seen = []
        for event in sse(client, f"/v1/jobs/{job}/events"):
            seen.append(event)
            if sum(kind == "progress" for kind, _, _ in seen) >= 5:
                break
        last_id = seen[-1][2]
        assert isinstance(last_id, int)
    first.kill()

    second: ServerProcess = server_factory(data_dir).start()
    with second.client() as client:
        resumed = sse(client, f"/v1/jobs/{job}/events", **{"Last-Event-ID": str(last_id)})
        kind, data, ident = next(resumed)
        resumed.close()
        client.post(f"/v1/jobs/{job}/cancel")
    assert isinstance(ident, int) and ident > last_id, (kind, ident, last_id)
    assert (kind, data["status"], data["attempt"]) == ("status", "running", 2), (kind, data)


def _done(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] not in ("queued", "running") else None


def test_clean_shutdown_puts_the_running_job_back_without_spending_an_attempt(
    server_factory: Any, tmp_path: Path
) -> None:
    """SIGTERM (a deploy, a restart): the running job stops within a step and waits in the queue, not failed."""
    data_dir = tmp_path / "data"
    first: ServerProcess = server_factory(data_dir, IMAGESMITH_LOG_FORMAT="json").start()
    with first.client() as client:
        job_id = client.post("/v1/jobs", json=SLOW).json()["id"]
        wait_for(lambda: (client.get(f"/v1/jobs/{job_id}").json().get("step") or 0) >= 2)
    first.stop()
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        status, attempts = db.execute("SELECT status, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert (status, attempts) == ("queued", 0)
    # Structured logs: one JSON object a line, the job's lines carrying its id.
    entries = [json.loads(line) for line in first.log.read_text().splitlines() if line.startswith("{")]
    assert any(
        entry.get("job_id") == job_id and "put back in the queue" in entry["message"] for entry in entries
    )

    second: ServerProcess = server_factory(data_dir).start()
    with second.client() as client:
        job = wait_for(lambda: _done(client, job_id), timeout=90)
    assert job["status"] == "succeeded" and job["attempts"] == 1


def test_a_request_waiting_for_its_image_is_answered_at_shutdown_and_its_job_kept(
    server_factory: Any, tmp_path: Path
) -> None:
    """SIGTERM while a synchronous request waits behind a running job: it gets a 503 with its job id at once,
    not a dropped connection when the grace period ends, and the job runs after the restart."""
    import threading
    import time

    data_dir = tmp_path / "data"
    first: ServerProcess = server_factory(data_dir).start()
    answer: dict[str, Any] = {}

    def wait_for_an_image() -> None:
        body = {"prompt": "behind the slow one", "use_generation": True, "use_pexels": False, "seed": 3}
        began = time.monotonic()
        response = httpx.post(f"{first.url}/api/media/generate-image", json=body, timeout=60)
        answer.update(response=response, seconds=time.monotonic() - began)

    with first.client() as client:
        running = client.post("/v1/jobs", json=SLOW).json()["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{running}").json()["status"] == "running")
        waiter = threading.Thread(target=wait_for_an_image)
        waiter.start()
        wait_for(lambda: client.get("/v1/jobs").json()["total"] == 2)
    assert first.process is not None
    stopped_at = time.monotonic()
    first.process.terminate()
    waiter.join(30)
    response = answer["response"]
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "shutting_down" and error["job_id"] in error["message"]
    # It sent no Idempotency-Key: resending would make a second job, and the message says so rather than
    # suggest a key it never had.
    assert "sending the request again would make a second job" in error["message"]
    assert int(response.headers["Retry-After"]) > 0
    assert time.monotonic() - stopped_at < 8  # answered, not cut off after the 10 s grace period
    first.process.wait(30)

    second: ServerProcess = server_factory(data_dir).start()
    with second.client() as client:
        job = wait_for(lambda: _done(client, error["job_id"]), timeout=120)
    assert job["status"] == "succeeded"


# Eight 1024-pixel warm-ups: half a minute of start-up on the CPU, in passes of a second or two.
_LONG_WARM_UP = "1024x1024,1024x960,960x1024,960x960,1024x896,896x1024,896x896,1024x832"


@pytest.mark.parametrize(("sent", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_a_server_stopped_during_warm_up_exits_at_once_and_cleanly(
    server_factory: Any, tmp_path: Path, sent: signal.Signals, exit_code: int
) -> None:
    """Ctrl-C while the models warm up used to let the pass finish, start the next one, and abort at exit
    ('terminate called without an active exception', exit 134): a thread was inside torch while the
    interpreter shut down. Now the warm-up stops within a step and the exit waits for it. SIGTERM never aborted
    (uvicorn re-raises it after its graceful shutdown, and it ends the process without the interpreter's
    shutdown); it must not be made to wait either."""
    server: ServerProcess = server_factory(
        tmp_path / "data", IMAGESMITH_WARMUP="true", IMAGESMITH_WARMUP_SIZES=_LONG_WARM_UP
    ).start(wait_ready=False)
    assert server.process is not None

    def warming_up() -> bool:
        try:
            return "warm-up 1 of" in httpx.get(f"{server.url}/v1/health", timeout=2).text
        except httpx.TransportError:
            return False

    wait_for(warming_up, timeout=60)
    server.process.send_signal(sent)
    code = server.process.wait(60)
    log = server.log.read_text()
    assert "terminate called" not in log
    assert code == exit_code, log[-3000:]
    assert "stopping start-up (warm-up 1 of 8" in log
    if sent is signal.SIGINT:  # the exit waited for the loading thread to see the stop
        assert "start-up stopped during warm-up" in log
    # Stopped within the pass it was in, not after the rest of the warm-up.
    assert len(re.findall(r"warm-up \d+x\d+ batch \d+ done at", log)) <= 2, log[-3000:]
    assert "warm-up done" not in log


def test_a_second_server_on_the_data_dir_is_refused_and_leaves_the_running_job_alone(
    server_factory: Any, tmp_path: Path
) -> None:
    """It used to start, requeue the job the first server was running (recover() took it for a crash's
    leftover) and run it too: twice the work, and the first run's end written over the second's row."""
    data_dir = tmp_path / "data"
    first: ServerProcess = server_factory(data_dir).start()
    with first.client() as client:
        job_id = client.post("/v1/jobs", json=SLOW).json()["id"]
        wait_for(lambda: (client.get(f"/v1/jobs/{job_id}").json().get("step") or 0) >= 2)
        second: ServerProcess = server_factory(data_dir).start(wait_ready=False)
        assert second.process is not None
        assert second.process.wait(60) == 2  # a settings conflict, as a port in use
        assert f"in use by another imagesmith process (pid {first.process.pid})" in second.log.read_text()
        job = wait_for(lambda: _done(client, job_id), timeout=90)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job  # run once, by the first server


def test_a_start_removes_image_files_a_crash_left_half_written(
    app_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """A kill -9 between writing an image's temporary file and renaming it left the file for good."""
    images = tmp_path / "data" / "images" / "ab"
    images.mkdir(parents=True)
    (images / ".tmp-k2j4h1").write_bytes(b"half a png")
    whole = images / ("ab" + "0" * 62 + ".png")
    whole.write_bytes(b"a stored image")
    with app_client() as client:
        assert client.get("/v1/health").status_code in (200, 503)
        assert not (images / ".tmp-k2j4h1").exists()
        assert whole.read_bytes() == b"a stored image"


def test_a_start_that_fails_lets_go_of_the_job_store(tmp_path: Path) -> None:
    """A setting that failed the start after the store was open (an allowed Pexels host that is not a host)
    kept the store's lock: the next app in the process was told another process had it (its own pid)."""
    from imagesmith.api import create_app
    from imagesmith.config import Settings

    # The settings refuse such a host when they load now; copied in unvalidated, it fails the start as it did.
    broken = Settings(data_dir=tmp_path, pexels_api_key="k").model_copy(
        update={"pexels_allowed_hosts": ["ftp://images.pexels.com"]}
    )
    with pytest.raises(ValueError, match="pexels"), TestClient(create_app(broken, lambda _: None)):
        pass
    fixed = Settings(data_dir=tmp_path, warmup=False)
    with TestClient(create_app(fixed, lambda _: None)) as client:
        assert client.get("/v1/health").status_code in (200, 503)
