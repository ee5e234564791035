"""HEAD and OPTIONS on the health routes, and HEAD on /metrics and GET /v1/jobs: load balancers and uptime
monitors check with HEAD (HAProxy's `option httpchk` with OPTIONS), and all of them got a 405."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from fastapi.testclient import TestClient
from polling import wait_for
from service_helpers import ServerProcess, held_start

HEALTH = ("/v1/health", "/api/media/health")
KEYED = ("/metrics", "/v1/jobs")
ALLOW = "GET, HEAD, OPTIONS"


def assert_head_is_get_without_a_body(client: TestClient | httpx.Client, path: str, **kwargs: Any) -> int:
    """HEAD answers as GET does: the same status and headers (Content-Length included, but /metrics', whose
    figures may move between two calls), and no body. Returns the status."""
    got = client.get(path, **kwargs)
    head = client.head(path, **kwargs)
    assert head.status_code == got.status_code, (path, head.status_code, got.text)
    assert head.content == b"", path
    unstable = {"date"} | ({"content-length"} if path == "/metrics" else set())
    assert {k: v for k, v in head.headers.items() if k not in unstable} == {
        k: v for k, v in got.headers.items() if k not in unstable
    }, path
    assert int(head.headers["content-length"]) > 0, path  # the length GET's body has, not 0
    return head.status_code


def test_head_answers_as_get_without_a_body(app_client: Callable[..., TestClient]) -> None:
    with app_client() as client:
        wait_for(lambda: client.get("/v1/health").json().get("status") != "starting")
        for path in (*HEALTH, *KEYED):
            assert assert_head_is_get_without_a_body(client, path) == 200
        assert client.head("/metrics").headers["content-type"].startswith("text/plain")
        assert client.head("/v1/health").headers["content-type"] == "application/json"
        assert (
            assert_head_is_get_without_a_body(client, "/v1/jobs", params={"limit": 0}) == 422
        )  # checked too
        # One job: HEAD on it was a 405 where GET answered (a black-box session's finding); an unknown one is 404.
        job = client.post("/v1/jobs", json={"prompt": "a fox", "num_inference_steps": 20}).json()["id"]
        # Finished first: a running job's view (and its length) changes from one call to the next.
        wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] not in ("queued", "running"))
        assert assert_head_is_get_without_a_body(client, f"/v1/jobs/{job}") == 200
        assert assert_head_is_get_without_a_body(client, "/v1/jobs/no-such-job") == 404


def test_head_on_health_is_503_while_starting_and_when_failed(
    app_client: Callable[..., TestClient], tiny_engine: Any
) -> None:
    slow_start, release = held_start(tiny_engine)
    with app_client(engine_factory=slow_start) as client:
        assert client.head("/v1/health").status_code == 503
        assert assert_head_is_get_without_a_body(client, "/v1/health") == 503  # "starting"
        assert assert_head_is_get_without_a_body(client, "/api/media/health") == 200  # the seed's: always 200
        release.set()
        wait_for(lambda: client.head("/v1/health").status_code == 200)
        client.app.state.worker.stop()  # type: ignore[attr-defined]
        assert client.get("/v1/health").json()["status"] == "failed"
        assert assert_head_is_get_without_a_body(client, "/v1/health") == 503


def test_head_needs_the_key_where_get_does(app_client: Callable[..., TestClient]) -> None:
    with app_client(api_keys="alpha") as client:
        wait_for(lambda: client.get("/v1/health").json().get("status") != "starting")
        for path in KEYED:
            assert assert_head_is_get_without_a_body(client, path) == 401
            refused = client.head(path)
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.headers["content-type"] == "application/json"
            wrong = {"Authorization": "Bearer wrong"}
            assert assert_head_is_get_without_a_body(client, path, headers=wrong) == 401
            keyed = {"Authorization": "Bearer alpha"}
            assert assert_head_is_get_without_a_body(client, path, headers=keyed) == 200
        for path in HEALTH:  # health needs no key: the public fields without one, the full report with one
            assert assert_head_is_get_without_a_body(client, path) == 200
            keyed = {"Authorization": "Bearer alpha"}
            assert assert_head_is_get_without_a_body(client, path, headers=keyed) == 200
            assert (
                client.head(path).headers["content-length"]
                != client.head(path, headers=keyed).headers["content-length"]
            )


def test_options_on_health_names_the_methods(app_client: Callable[..., TestClient]) -> None:
    """HAProxy's `option httpchk OPTIONS /v1/health` wants a 2xx; no CORS is offered."""
    with app_client(api_keys="alpha") as client:  # no key needed, as for GET
        for path in HEALTH:
            response = client.options(path)
            assert response.status_code == 200, (path, response.text)
            assert response.headers["allow"] == ALLOW
            assert response.content == b""
            assert not any(name.startswith("access-control-") for name in response.headers)
            preflight = client.options(
                path, headers={"Origin": "https://x.example", "Access-Control-Request-Method": "GET"}
            )
            assert preflight.status_code == 200
            assert not any(name.startswith("access-control-") for name in preflight.headers)


def test_other_methods_and_routes_keep_their_405(app_client: Callable[..., TestClient]) -> None:
    with app_client() as client:
        # Allow lists every method the path takes (HEAD and OPTIONS too: RFC 9110, and what OPTIONS says);
        # the message names the ones a client means to call.
        for method, path, allowed, said in [
            ("POST", "/v1/health", ALLOW, "GET"),
            ("DELETE", "/api/media/health", ALLOW, "GET"),
            ("PUT", "/metrics", "GET, HEAD", "GET"),
            ("OPTIONS", "/metrics", "GET, HEAD", "GET"),
            ("OPTIONS", "/v1/jobs", "GET, HEAD, POST", "GET or POST"),
            ("HEAD", "/api/media/generate-image", "POST", "POST"),
        ]:
            response = client.request(method, path)
            assert response.status_code == 405, (method, path, response.text)
            assert response.headers["allow"] == allowed, (method, path)
            if method != "HEAD":
                assert response.json()["error"]["code"] == "method_not_allowed"
                assert response.json()["error"]["message"] == f"{path} takes {said}, not {method}"


def test_a_real_server_answers_head_and_options(server: ServerProcess) -> None:
    """As a load balancer or `curl -I` sees it, through uvicorn."""
    with server.client() as client:
        for path in (*HEALTH, *KEYED):
            assert assert_head_is_get_without_a_body(client, path) == 200
            assert client.head(path).headers["server"] == "uvicorn"
        for path in HEALTH:
            response = client.options(path)
            assert response.status_code == 200 and response.headers["allow"] == ALLOW, path
            assert response.content == b""
