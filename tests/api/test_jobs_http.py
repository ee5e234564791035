"""Async jobs over real HTTP: SSE order and previews, cancel (queued and running), idempotency, paging, 429s."""

from __future__ import annotations

import threading
from typing import Any

import httpx
from polling import wait_for
from service_helpers import ServerProcess, sse

FAST = {"prompt": "a fox", "num_inference_steps": 20}
SLOW = {"prompt": "a slow fox", "width": 128, "height": 128, "num_inference_steps": 150}


def submit(client: httpx.Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return dict(response.json())


def wait_done(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (
                (j := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("queued", "running") and j
            )
        )
    )


def test_events_arrive_in_order_with_previews_and_end_with_the_result(server: ServerProcess) -> None:
    with server.client() as client:
        job = submit(client, FAST)
        events = list(sse(client, f"/v1/jobs/{job['id']}/events"))
    kinds = [kind for kind, _, _ in events]
    assert kinds[-1] == "succeeded"
    assert set(kinds[:-1]) <= {"status", "progress"}
    ids = [ident for _, _, ident in events[:-1] if isinstance(ident, int)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert events[-1][2] == "end"  # an EventSource that reconnects with it is told to stop (204)
    progress = [data for kind, data, _ in events if kind == "progress"]
    overall = [data["overall_step"] for data in progress]
    assert overall == sorted(overall) and overall[-1] == progress[-1]["overall_total"]
    # The decode is heard too (tens of seconds on a CPU): every step done, no time left once the pixels are made.
    assert (progress[-1]["stage"], progress[-1]["eta_s"]) == ("decode", 0.0)
    assert any(data.get("preview", "").startswith("data:image/jpeg;base64,") for data in progress)
    result = events[-1][1]["result"]
    assert result["source"] == "generate" and len(result["images"]) == 1


def test_events_of_a_finished_job_replay_the_outcome(server: ServerProcess) -> None:
    with server.client() as client:
        job = submit(client, FAST)
        wait_done(client, job["id"])
        events = list(sse(client, f"/v1/jobs/{job['id']}/events"))
    assert [kind for kind, _, _ in events] == ["succeeded"]
    with server.client() as client:
        # A browser's EventSource reconnects after the stream ends, sending the last id it saw.
        again = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "end"})
    assert again.status_code == 204  # "stop reconnecting", per the SSE specification
    with server.client() as client:
        # An id that is not one of ours replays from the start: '²' (byte 0xb2 as latin-1) passed isdigit()
        # and 5000 digits passed it too; int() refused both, a 500.
        for bad_id in (b"\xb2", b"9" * 5000, b"-3", b"twelve"):
            replayed = list(sse(client, f"/v1/jobs/{job['id']}/events", **{"Last-Event-ID": bad_id}))
            assert [kind for kind, _, _ in replayed] == ["succeeded"], bad_id


def test_a_reconnecting_client_resumes_after_its_last_event(server: ServerProcess) -> None:
    with server.client() as client:
        job = submit(client, SLOW)
        path = f"/v1/jobs/{job['id']}/events"
        first = []
        for event in sse(client, path):
            first.append(event)
            if len([e for e in first if e[0] == "progress"]) >= 3:
                break  # the connection drops here
        last_id = first[-1][2]
        assert isinstance(last_id, int)
        resumed = sse(client, path, **{"Last-Event-ID": str(last_id)})
        kind, _, ident = next(resumed)
        assert isinstance(ident, int) and ident > last_id, (kind, ident, last_id)
        resumed.close()
        client.post(f"/v1/jobs/{job['id']}/cancel")


def canceled_count(client: httpx.Client) -> float:
    """/metrics' count of jobs that ended canceled (the shared server's: compare before and after)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('imagesmith_jobs_finished_total{status="canceled"}'):
            return float(line.split()[-1])
    return 0.0


def test_cancel_running_and_queued(server: ServerProcess) -> None:
    with server.client() as client:
        canceled_before = canceled_count(client)
        running = submit(client, SLOW)
        queued = submit(client, FAST)
        stream = sse(client, f"/v1/jobs/{running['id']}/events")
        for kind, data, _ in stream:  # wait until it really runs
            if kind == "progress" and data["overall_step"] >= 2:
                break
        # Waiting behind the running job, first in line: in its own view and in the listing.
        assert client.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 0
        listed = {job["id"]: job for job in client.get("/v1/jobs").json()["jobs"]}
        assert listed[queued["id"]]["queue_position"] == 0
        assert listed[running["id"]]["queue_position"] is None
        # The queued one is canceled at once.
        response = client.post(f"/v1/jobs/{queued['id']}/cancel")
        assert response.status_code == 202
        assert response.json()["status"] == "canceled"
        # The running one stops within a step.
        client.post(f"/v1/jobs/{running['id']}/cancel")
        last = [kind for kind, _, _ in stream][-1]
        assert last == "canceled"
        final = client.get(f"/v1/jobs/{running['id']}").json()
        assert final["status"] == "canceled" and final["result"] is None
        assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "canceled"
        # Both ends counted: the queued one was not (a black-box session's finding).
        assert canceled_count(client) == canceled_before + 2
        # Again: already canceled, nothing more to do (200). A job that succeeded has nothing to cancel (409);
        # a 202 said the cancel was taken when nothing happened.
        again = client.post(f"/v1/jobs/{queued['id']}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "canceled"
        done = submit(client, FAST)
        wait_done(client, done["id"])
        late = client.post(f"/v1/jobs/{done['id']}/cancel")
        assert late.status_code == 409, late.text
        assert late.json()["error"]["code"] == "already_finished" and "already succeeded" in late.text
        assert client.get(f"/v1/jobs/{done['id']}").json()["status"] == "succeeded"


def test_idempotency_key_makes_retries_safe(server: ServerProcess) -> None:
    with server.client() as client:
        first = submit(client, FAST, **{"Idempotency-Key": "retry-me-1"})
        again = client.post("/v1/jobs", json=FAST, headers={"Idempotency-Key": "retry-me-1"})
        assert again.status_code == 202 and again.json()["id"] == first["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        other = client.post(
            "/v1/jobs", json={**FAST, "prompt": "else"}, headers={"Idempotency-Key": "retry-me-1"}
        )
        assert other.status_code == 409
        assert other.json()["error"]["field"] == "Idempotency-Key"
        wait_done(client, first["id"])


def test_list_pages_newest_first_and_unknown_job_is_404(server: ServerProcess) -> None:
    with server.client() as client:
        ids = [submit(client, FAST)["id"] for _ in range(2)]
        for job_id in ids:
            wait_done(client, job_id)
        page = client.get("/v1/jobs", params={"limit": 1}).json()
        assert page["jobs"][0]["id"] == ids[-1]
        assert page["next_offset"] == 1 and page["total"] >= 2
        second = client.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()
        assert second["jobs"][0]["id"] == ids[-2]
        assert client.get("/v1/jobs", params={"status": "succeeded"}).status_code == 200
        unfiltered = client.get("/v1/jobs?status=&limit=1")  # a form's "any": no filter
        assert unfiltered.status_code == 200 and unfiltered.json()["total"] == page["total"], unfiltered.text
        bad = client.get("/v1/jobs", params={"status": "done"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "status"
        # Repeated, the jobs in any of them: not only the last value's (none queued here, so that gave 0).
        succeeded = client.get("/v1/jobs", params={"status": "succeeded"}).json()["total"]
        either = client.get("/v1/jobs", params=[("status", "succeeded"), ("status", "queued")])
        assert either.status_code == 200 and either.json()["total"] >= succeeded >= 2, either.text
        bad_second = client.get("/v1/jobs", params=[("status", "succeeded"), ("status", "done")])
        assert bad_second.status_code == 422 and bad_second.json()["error"]["field"] == "status", (
            bad_second.text
        )
        missing = client.get("/v1/jobs/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_many_clients_over_the_queue_bound(server: ServerProcess) -> None:
    """Queue bound 4, 16 clients at once: each accepted job succeeds, each refused one got 429 + Retry-After."""
    results: list[httpx.Response] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def client_thread(index: int) -> None:
        with server.client() as client:
            barrier.wait()
            response = client.post("/v1/jobs", json={**FAST, "seed": index})
            with lock:
                results.append(response)

    threads = [threading.Thread(target=client_thread, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    accepted = [r for r in results if r.status_code == 202]
    refused = [r for r in results if r.status_code != 202]
    assert accepted and refused
    for response in refused:
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "queue_full"
        assert int(response.headers["Retry-After"]) > 0
    with server.client() as client:
        for response in accepted:
            assert wait_done(client, response.json()["id"])["status"] == "succeeded"
        metrics = client.get("/metrics").text
    assert "imagesmith_queue_depth" in metrics and 'imagesmith_jobs{status="succeeded"}' in metrics
    assert 'imagesmith_stage_seconds_count{stage="base"}' in metrics


def test_an_ensemble_split_the_scheduler_cannot_run_is_a_422_at_submit(server: ServerProcess) -> None:
    """4 DPM++ steps at 0.8 all fall in the base (the scheduler's timesteps decide): refused when submitted,
    naming the field, rather than accepted and failed later."""
    with server.client() as client:
        response = client.post(
            "/v1/jobs", json={"prompt": "a fox", "scheduler": "dpmpp_2m", "num_inference_steps": 4}
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "high_noise_frac" and "the refiner 0" in error["message"]
        assert client.post("/v1/jobs", json={**FAST, "scheduler": "dpmpp_2m"}).status_code == 202


def test_an_unknown_field_people_send_for_one_of_ours_names_the_field_to_use(server: ServerProcess) -> None:
    """`steps` (the CLI's --steps) got pydantic's bare "Extra inputs are not permitted" (black-box bb-51)."""
    with server.client() as client:
        response = client.post("/v1/jobs", json={"prompt": "a fox", "steps": 20, "colour": "red"})
    assert response.status_code == 422, response.text
    details = {item["field"]: item["message"] for item in response.json()["error"]["details"]}
    assert details["steps"] == "steps is not a field of this request; did you mean num_inference_steps?"
    assert "did you mean" not in details["colour"]  # no guess where there is no likely one
