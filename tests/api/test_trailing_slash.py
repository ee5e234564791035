"""A trailing slash routes where the client meant it. It was a bare 307 (no body, no error format) that POST
clients not following redirects took for an empty answer, with no job made."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from polling import wait_for


def test_a_trailing_slash_reaches_the_route_without_a_redirect(app_client: Callable[..., TestClient]) -> None:
    with app_client() as client:
        wait_for(lambda: client.get("/v1/health").json().get("status") != "starting")
        body = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 4}
        made = client.post("/v1/jobs/", json=body, follow_redirects=False)
        assert made.status_code == 202, made.text
        job = made.json()["id"]
        got = client.get(f"/v1/jobs/{job}/", follow_redirects=False)
        assert got.status_code == 200 and got.json()["id"] == job
        assert client.get("/v1/health//", follow_redirects=False).status_code == 200
        # Bad input through the slashed path still gets the route's own error, naming the field.
        refused = client.post("/v1/jobs/", json={"prompt": "x", "width": 65}, follow_redirects=False)
        assert refused.status_code == 422 and "width" in refused.text
        assert client.get("/v1/nothing-here/", follow_redirects=False).status_code == 404
