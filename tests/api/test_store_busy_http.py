"""Another program (a backup, the sqlite3 shell) holding the job store's write lock, seen over real HTTP."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from service_helpers import ServerProcess

SUBMITS = 50  # more than the 40 threads of Starlette's default pool, which plain `def` routes run in


def test_health_and_job_reads_answer_while_submits_wait_out_another_programs_lock(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """Each submit waiting for the database's write lock held a thread of the default pool, which health, job
    views and /metrics run in too: 40 such submits, and the reads (which need no write lock) queued behind them,
    so health stopped answering just when an operator looked."""
    server = server_factory(imagesmith_queue_max="100", imagesmith_wait_timeout_s="1").start()
    with server.client() as client:
        existing = client.post("/v1/jobs", json={"prompt": "before", "num_inference_steps": 20}).json()["id"]

    outside = sqlite3.connect(server.data_dir / "jobs.sqlite3", isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")  # the other program's write lock (the store's busy timeout is 30 s)

    def submit(i: int) -> httpx.Response:
        # Both submit paths: POST /v1/jobs (202), and the seed's endpoint that submits and waits (waiting.py).
        path, body = (
            ("/v1/jobs", {"prompt": f"job {i}", "num_inference_steps": 20})
            if i % 2
            else (
                "/api/media/generate-image",
                {"prompt": f"job {i}", "use_generation": True, "use_pexels": False},
            )
        )
        return httpx.post(server.url + path, json=body, headers={"Idempotency-Key": f"k{i}"}, timeout=30)

    with ThreadPoolExecutor(SUBMITS) as pool:
        try:
            answers = [pool.submit(submit, i) for i in range(SUBMITS)]
            time.sleep(1.5)  # the submits have reached the server and wait on the lock
            assert not any(answer.done() for answer in answers), "the submits did not wait on the lock"
            for path in ("/v1/health", f"/v1/jobs/{existing}", "/metrics"):
                started = time.monotonic()
                try:
                    response = httpx.get(server.url + path, timeout=2)
                except httpx.TimeoutException:
                    raise AssertionError(f"GET {path} did not answer in 2 s while submits waited") from None
                assert response.status_code == 200, (path, response.text)
                assert time.monotonic() - started < 2
        finally:
            outside.execute("ROLLBACK")
            outside.close()
        results = [answer.result() for answer in answers]

    # After the release every submit is answered: accepted (202; the seed's endpoint 200, or 504 when its 1 s
    # wait ran out and the job goes on), or a clear 503 to retry; never a 500.
    statuses = [result.status_code for result in results]
    assert set(statuses) <= {200, 202, 504, 503}, [r.text for r in results if r.status_code not in (200, 202)]
    for result in results:
        if result.status_code == 503:
            assert result.json()["error"]["code"] == "storage_unavailable", result.text
    accepted = sum(status != 503 for status in statuses)
    # No accepted job lost, none made twice: the store holds the first job plus every accepted one.
    listing = httpx.get(server.url + "/v1/jobs", params={"limit": 1}, timeout=10).json()
    assert listing["total"] == 1 + accepted, (listing["total"], statuses)
    for result in results:
        if result.status_code == 202:
            job_id = result.json()["id"]
            assert httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).status_code == 200
