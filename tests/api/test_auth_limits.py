"""Auth, limits, start-up 503s and error shapes, on in-process apps (the lifespan runs; the engine is shared), and
over real HTTP on the shared server where the wire matters."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from polling import wait_for
from service_helpers import ServerProcess, held_start

from imagesmith.config import Settings

BODY = {"prompt": "a fox", "num_inference_steps": 20}


def test_api_keys_guard_everything_but_health(app_client: Callable[..., TestClient]) -> None:
    with app_client(api_keys="alpha, beta") as client:
        for method, path in [
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs"),
            ("GET", "/metrics"),
            ("POST", "/api/media/generate-image"),
        ]:
            response = client.request(method, path, json=BODY)
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.json()["error"]["field"] == "Authorization"  # the header to fix
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": "Basic alpha"}).status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer beta"}).status_code == 200
        assert client.get("/api/media/health").status_code == 200
        assert client.get("/v1/health").json()["auth"] is True


def test_a_caller_without_a_key_gets_401_whatever_the_body(app_client: Callable[..., TestClient]) -> None:
    """FastAPI reads the body before a route's dependencies: malformed JSON or a bad field got a 422 that
    described the route to a caller without a key, where a well-formed body got the 401."""
    bad_bodies = [b"{bad", b'{"prompt": "x", "width": "wide"}']
    with app_client(api_keys="alpha") as client:
        for path in ("/v1/jobs", "/api/media/generate-image", "/v1/images/generations", "/sdapi/v1/txt2img"):
            for body in bad_bodies:
                response = client.post(path, content=body, headers={"Content-Type": "application/json"})
                assert response.status_code == 401, (path, body, response.text)
            keyed = client.post(
                path,
                content=b"{bad",
                headers={"Content-Type": "application/json", "Authorization": "Bearer alpha"},
            )
            assert keyed.status_code in (400, 422), (path, keyed.text)  # with the key: what is wrong with it


def test_limits_name_the_field(app_client: Callable[..., TestClient]) -> None:
    with app_client(max_prompt_chars=50, max_images_per_request=2, max_total_pixels=128 * 128) as client:
        cases: list[tuple[dict[str, Any], str]] = [
            ({**BODY, "prompt": "p" * 51}, "prompt"),
            ({**BODY, "negative_prompt": "n" * 51}, "negative_prompt"),
            ({**BODY, "num_images": 3}, "num_images"),
            ({**BODY, "width": 256, "height": 128}, "width"),
            ({**BODY, "prompt": "p" * 2001}, "prompt"),
        ]
        for body, field in cases:
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error"]["field"] == field


def test_a_prompt_past_the_schemas_ceiling_names_the_servers_own_limit(
    app_client: Callable[..., TestClient],
) -> None:
    """A 2001-character prompt was an invalid_request saying "at most 2000 characters", even on a server taking
    50, while a 51-character one was a limit_exceeded naming 50: both now name the server's limit."""
    with app_client(max_prompt_chars=50) as client:
        for field, length in (("prompt", 51), ("prompt", 2001), ("negative_prompt", 2001)):
            response = client.post("/v1/jobs", json={**BODY, field: "p" * length})
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert (error["code"], error["field"]) == ("limit_exceeded", field), error
            assert f"{field} is {length} characters; this server takes at most 50" in error["message"], error


def test_too_many_images_are_refused_naming_the_servers_limit_on_every_route(
    app_client: Callable[..., TestClient],
) -> None:
    """num_images=5 answered "Input should be less than or equal to 4" (the schema's cap) on a server that makes
    at most 2: each route that takes a count names the server's limit, under the name the client sent."""
    native = "num_images is {}; this server makes at most 2 per request (max_images_per_request): ask for 2 or fewer"
    generate_only = {"use_pexels": False, "use_generation": True}
    with app_client(max_images_per_request=2) as client:
        for count in (5, 32, 40, 3):  # past the old schema cap, at the new one, past it, and under both
            cases: list[tuple[str, dict[str, Any], int, str, str]] = [
                ("/v1/jobs", {**BODY, "num_images": count}, 422, "num_images", native.format(count)),
                (
                    "/api/media/generate-image",
                    {**BODY, **generate_only, "num_images": count},
                    422,
                    "num_images",
                    native.format(count),
                ),
                (
                    "/v1/images/generations",
                    {"prompt": "a fox", "n": count},
                    400,
                    "n",
                    f"1 and 2 on this server, got {count}",
                ),
                (
                    "/sdapi/v1/txt2img",
                    {"prompt": "a fox", "batch_size": count},
                    422,
                    "batch_size",
                    "at most 2 per request",
                ),
            ]
            for path, body, status, field, message in cases:
                response = client.post(path, json=body)
                assert response.status_code == status, (path, response.text)
                error = response.json()["error"]
                if isinstance(error, dict):  # ours and OpenAI's; A1111's error is a code beside its fields
                    answer = (error.get("field") or error.get("param"), error["message"])
                else:
                    answer = (response.json()["field"], response.json()["detail"])
                assert answer[0] == field and message in answer[1], (path, count, response.text)
                if not path.startswith(("/v1/images", "/sdapi")):  # one code, whichever check found it
                    assert error["code"] == "limit_exceeded", (path, count, response.text)


def test_body_size_limit(app_client: Callable[..., TestClient]) -> None:
    with app_client(max_body_bytes=2048) as client:
        response = client.post("/v1/jobs", json={**BODY, "negative_prompt": "x" * 4000})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
        # Streamed (chunked, no Content-Length): refused while it is read, with the same answer.
        chunks = (b"x" * 500 for _ in range(10))
        response = client.post("/v1/jobs", content=chunks, headers={"Content-Type": "application/json"})
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "body_too_large"
        # A compatibility route answers in its own dialect, whichever way the size was found out.
        big = {"prompt": "x" * 4000}
        openai = client.post("/v1/images/generations", json=big)
        assert openai.status_code == 413 and openai.json()["error"]["type"] == "invalid_request_error"
        a1111 = client.post("/sdapi/v1/txt2img", json=big)
        assert (
            a1111.status_code == 413 and a1111.json()["error"] == "body_too_large" and a1111.json()["detail"]
        )


def test_a_big_upload_to_a_route_not_served_hears_that_not_the_body_limit(server: ServerProcess) -> None:
    """Any real image is over the 64 KiB default limit: POST /v1/images/edits, /v1/images/variations and the
    A1111 /sdapi/v1/img2img answered 413 body_too_large, and the caller learnt only after raising the limit that
    the route is not served. A route that reads a body still refuses one that is too large."""
    image = b"\x89PNG\r\n\x1a\n" + bytes(100 * 1024)  # a PNG's signature and 100 KiB
    with server.client() as client:
        for path in ("/v1/images/edits", "/v1/images/variations"):
            response = client.post(
                path,
                files={"image": ("image.png", image, "image/png")},
                data={"prompt": "a fox", "model": "dall-e-2"},
            )
            assert response.status_code == 404, (path, response.text)
            error = response.json()["error"]  # OpenAI's error object
            assert error["code"] == "not_supported" and error["type"] == "invalid_request_error", error
            assert "POST /v1/images/generations" in error["message"], error
        big = {"prompt": "a fox", "init_images": [base64.b64encode(image).decode("ascii")]}
        response = client.post("/sdapi/v1/img2img", json=big)
        assert response.status_code == 404, response.text
        answer = response.json()  # A1111's shape, naming the routes served
        assert answer["error"] == "not_found" and "POST /sdapi/v1/txt2img" in answer["detail"], answer
        # A route that reads its body: refused on the declared length, as before.
        response = client.post("/v1/images/generations", json={"prompt": "x" * (100 * 1024)})
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "body_too_large"
        assert "65536 bytes" in response.json()["error"]["message"]
        # A path served under another method only: its 405, not the body limit.
        response = client.put("/v1/jobs", content=image, headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_no_client_chosen_paths(app_client: Callable[..., TestClient]) -> None:
    with app_client() as client:
        for name in ["..%2F..%2Fetc%2Fpasswd", "jobs.sqlite3", "0" * 64 + ".exe", "../../jobs.sqlite3"]:
            response = client.get(f"/v1/images/{name}")
            assert response.status_code == 404, name
        assert client.post("/v1/jobs", json={**BODY, "output_path": "/tmp/x.png"}).status_code == 422


def test_unknown_routes_and_methods_are_json(app_client: Callable[..., TestClient]) -> None:
    with app_client() as client:
        assert client.get("/nope").json()["error"]["code"] == "not_found"
        response = client.put("/v1/jobs")
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_while_models_load_generation_gets_503_with_retry_after(
    app_client: Callable[..., TestClient], tiny_engine: Any
) -> None:
    slow_start, release = held_start(tiny_engine)
    with app_client(engine_factory=slow_start) as client:
        health = client.get("/v1/health")
        assert health.status_code == 503 and health.json()["status"] == "starting"
        assert client.get("/api/media/health").json()["sdxl_ok"] is False
        response = client.post("/v1/jobs", json=BODY)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "starting"
        assert int(response.headers["Retry-After"]) > 0
        release.set()
        for _ in range(100):
            if client.get("/v1/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.post("/v1/jobs", json=BODY).status_code == 202


def test_failed_model_load_reports_failed(app_client: Callable[..., TestClient]) -> None:
    def broken(_: Settings) -> Any:
        raise RuntimeError("no such model")

    with app_client(engine_factory=broken) as client:
        for _ in range(100):
            body = client.get("/api/media/health").json()
            if body["status"] != "starting":
                break
            threading.Event().wait(0.02)
        assert body["status"] == "failed" and "no such model" in body["reasons"][0]
        response = client.post("/v1/jobs", json=BODY)
        assert response.status_code == 503 and response.json()["error"]["code"] == "source_unavailable"


def test_a_malformed_idempotency_key_is_refused_on_every_route(app_client: Callable[..., TestClient]) -> None:
    """The check lives in JobService.submit, where every route submits; the seed endpoint used to skip it."""
    bad = {"Idempotency-Key": "has spaces in it"}
    with app_client() as client:
        for path, body in (
            ("/v1/jobs", BODY),
            ("/api/media/generate-image", {**BODY, "use_generation": True}),
        ):
            response = client.post(path, json=body, headers=bad)
            assert response.status_code == 422, (path, response.text)
            error = response.json()["error"]
            assert error["field"] == "Idempotency-Key" and error["code"] == "invalid_request"


def test_image_urls_are_capability_urls_unless_set_to_need_the_key(
    app_client: Callable[..., TestClient],
) -> None:
    unknown = "/v1/images/" + "0" * 64 + ".png"
    with app_client(api_keys="alpha") as client:
        assert client.get(unknown).status_code == 404  # no key asked: the name itself is the secret
    with app_client(api_keys="alpha", image_urls_need_key=True) as client:
        assert client.get(unknown).status_code == 401
        assert client.get(unknown, headers={"Authorization": "Bearer alpha"}).status_code == 404


def test_health_fails_when_the_worker_thread_has_stopped(app_client: Callable[..., TestClient]) -> None:
    """A stopped worker runs nothing again: health must say failed (503), not ready or degraded with a 200."""
    with app_client() as client:
        assert client.get("/v1/health").json()["status"] in ("ready", "starting", "degraded")
        client.app.state.worker.stop()  # type: ignore[attr-defined]
        response = client.get("/v1/health")
        assert response.status_code == 503
        report = response.json()
        assert report["status"] == "failed" and any(
            "worker thread has stopped" in r for r in report["reasons"]
        )


def test_health_tells_a_caller_without_a_key_the_status_only(app_client: Callable[..., TestClient]) -> None:
    """Model paths, load errors and Pexels details are for key holders; the status fields are for everyone
    (load balancers, the seed's clients)."""
    with app_client(api_keys="alpha") as client:
        for path in ("/v1/health", "/api/media/health"):
            public = client.get(path).json()
            assert {"status", "pexels_ok", "sdxl_ok", "queue"} <= public.keys()
            assert not {"models", "plan", "device", "pexels", "reasons", "sources"} & public.keys()
            full = client.get(path, headers={"Authorization": "Bearer alpha"}).json()
            assert {"models", "plan", "reasons", "pexels"} <= full.keys()
    with app_client() as client:  # no keys: the service is open, and so is the full report
        assert "models" in client.get("/v1/health").json()


def test_a_job_store_that_cannot_be_written_is_a_503_to_retry(
    app_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk failed the submit's transaction, and the client got a 500 "internal error", as for a bug.
    Nothing was accepted; the client should retry later, and is told so."""
    import sqlite3

    with app_client() as client:
        store = client.app.state.store  # type: ignore[attr-defined]

        def disk_full(*args: Any, **kwargs: Any) -> Any:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store, "submit", disk_full)
        for path in ("/v1/jobs", "/api/media/generate-image"):
            response = client.post(path, json={**BODY, "use_generation": True} if "media" in path else BODY)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "storage_unavailable"
            assert "database or disk is full" in response.json()["error"]["message"]
            assert int(response.headers["Retry-After"]) > 0
        # A load balancer sees it too: "degraded" with the reason, where health said "ready".
        health = client.get("/v1/health").json()
        assert health["status"] == "degraded", health
        assert any("job store could not be written" in reason for reason in health["reasons"])
        # Once a write succeeds the store works again: health said "new jobs get 503" for a minute while they
        # were accepted (a black-box session's finding).
        monkeypatch.undo()
        assert client.post("/v1/jobs", json=BODY).status_code == 202
        reasons = client.get("/v1/health").json().get("reasons", [])
        assert not any("job store could not be written" in reason for reason in reasons)


def test_health_is_degraded_for_a_while_after_images_could_not_be_written(
    app_client: Callable[..., TestClient],
) -> None:
    import time

    with app_client() as client:
        wait_for(lambda: client.get("/v1/health").json().get("status") != "starting")
        worker = client.app.state.worker  # type: ignore[attr-defined]
        worker.image_write_failure = (time.monotonic(), "OSError: [Errno 28] No space left on device")
        health = client.get("/v1/health").json()
        assert health["status"] == "degraded", health
        assert any("images could not be written" in r and "No space left" in r for r in health["reasons"])
        worker.image_write_failure = (time.monotonic() - 61, "OSError: [Errno 28] No space left on device")
        assert not any("images could not be written" in r for r in client.get("/v1/health").json()["reasons"])


def test_a_wait_that_runs_out_is_a_504_naming_the_job_which_goes_on(
    app_client: Callable[..., TestClient],
) -> None:
    body = {"prompt": "waits", "use_generation": True, "use_pexels": False}
    with app_client(wait_timeout_s=0.2) as client:
        wait_for(lambda: client.get("/v1/health").json().get("status") != "starting")
        client.app.state.worker.pause_claims()  # type: ignore[attr-defined]  # the job waits, whatever the CPU
        response = client.post("/api/media/generate-image", json=body)
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error["code"] == "timeout" and error["job_id"] in error["message"]  # machine-readable, too
        job = client.get(f"/v1/jobs/{error['job_id']}").json()
        assert job["status"] == "queued"  # the wait ran out; the job did not
        client.post(f"/v1/jobs/{error['job_id']}/cancel")


def test_a_short_wait_ends_on_time_while_its_job_sends_progress(
    app_client: Callable[..., TestClient],
) -> None:
    """A 0.2 s wait on a running job that sends an event every step lasted the whole job (9 s) twice in this
    session's runs, then not again. The suspect: the heartbeat's wait_for and the wait's timeout firing
    together, where Python 3.11's wait_for can lose the cancel. The wait now checks its deadline at every event
    and heartbeat too; this checks it ends on time, three waits in a row."""
    import time

    slow = {"prompt": "slow", "use_generation": True, "use_pexels": False, "num_inference_steps": 60}
    slow |= {"width": 512, "height": 512}
    with app_client(wait_timeout_s=0.2) as client:
        wait_for(lambda: client.get("/v1/health").json().get("status") != "starting")
        for _ in range(3):
            started = time.monotonic()
            response = client.post("/api/media/generate-image", json=slow)
            assert response.status_code == 504, response.text
            assert time.monotonic() - started < 2.0
            client.post(f"/v1/jobs/{response.json()['error']['job_id']}/cancel")


def test_a_query_the_store_rejects_is_a_500_not_a_retry(
    app_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite raises the same OperationalError class for a full disk and for a bad query; only the first is
    for the client to retry later. A bug told clients "retry later" for ever."""
    import sqlite3

    with app_client() as client:
        store = client.app.state.store  # type: ignore[attr-defined]

        def bad_query(*args: Any, **kwargs: Any) -> Any:
            return sqlite3.connect(":memory:").execute("SELECT no_such_column FROM sqlite_master")

        monkeypatch.setattr(store, "submit", bad_query)
        response = client.post("/v1/jobs", json=BODY)
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
