"""Stock photos through the real service: uvicorn on 127.0.0.1 with the tiny model, Pexels a stand-in server.

One server serves the module's ordered story (photo, no results, 5xx, quota spent then reset); the bad key and
the 429 get a fresh server, since they leave Pexels refused or blocked for the rest of its life.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pexels_standin import API_KEY, StandIn
from PIL import Image
from polling import wait_for
from service_helpers import ServerProcess

from imagesmith.sources.attribution import read_attribution

# Fast generation on the tiny model, for the requests that end up generating.
QUICK = {"num_inference_steps": 20, "use_refinement": False}


def stock_env(standin: StandIn, **more: str) -> dict[str, str]:
    return {
        "imagesmith_pexels_api_key": API_KEY,
        "imagesmith_pexels_api_base_url": f"{standin.base_url}/v1",
        "imagesmith_pexels_allowed_hosts": standin.base_url,
        "imagesmith_pexels_retry_backoff_s": "0.001",
        "imagesmith_pexels_timeout_s": "2",
        **more,
    }


@pytest.fixture(scope="module")
def stock_server(
    _standin_server: StandIn, tiny_model_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("stock"), tiny_model_home, **stock_env(_standin_server))
    proc.start()
    yield proc
    proc.stop()


def seed(server: ServerProcess, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/media/generate-image", json={"prompt": "a photo", **body}, timeout=60
    )


def health(server: ServerProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/v1/health").json()
    return body


def metric(server: ServerProcess, line_start: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(line_start + " ")]
    assert values, f"{line_start} not in /metrics"
    return float(values[0])


def test_seed_defaults_serve_a_stock_photo_with_its_credit_everywhere(
    standin: StandIn, stock_server: ServerProcess
) -> None:
    assert health(stock_server)["pexels_ok"] is True
    # The seed's defaults (use_pexels=true, use_generation=false): a stock photo, at the server's 64x64.
    response = seed(stock_server, keywords=["mountain", "lake"], output_format="jpeg")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["source"], body["source_reason"]) == ("stock", "requested")
    credit = body["attribution"]
    assert credit["photographer"] and credit["photographer_url"].startswith("https://www.pexels.com/@")
    assert credit["photo_url"].startswith("https://www.pexels.com/photo/")
    assert credit["alt"] and credit["avg_color"] == "#7A8B6C"
    assert credit["credit_text"] == f"Photo by {credit['photographer']} on Pexels"
    assert f'href="{credit["photographer_url"]}"' in credit["credit_html"]
    assert body["metadata"]["query"] == "mountain lake" and body["metadata"]["orientation"] == "square"
    assert standin.seen[0]["params"]["orientation"] == "square"

    # The file: exact size, stored byte for byte (content-addressed, not re-encoded), credit inside.
    image = body["images"][0]
    fetched = httpx.get(body["image_url"])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    assert hashlib.sha256(fetched.content).hexdigest() == image["sha256"]
    assert body["image_url"].endswith(f"/v1/images/{image['sha256']}.jpg")
    with Image.open(io.BytesIO(fetched.content)) as picture:
        assert picture.size == (64, 64) == (image["width"], image["height"])
    embedded = read_attribution(fetched.content)
    assert embedded is not None and embedded.model_dump(mode="json") == credit
    on_disk = stock_server.data_dir / "images" / image["sha256"][:2] / f"{image['sha256']}.jpg"
    assert on_disk.read_bytes() == fetched.content

    # The job result carries the same story.
    job = httpx.get(f"{stock_server.url}/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "succeeded"
    result = job["result"]
    assert result["source"] == "stock" and result["attribution"] == credit
    assert result["attempts"] == [
        {"source": "stock", "served": True, "reason": "requested", "detail": "", "retry_at": None}
    ]


def test_png_by_default_and_jobs_api_with_stock_first(standin: StandIn, stock_server: ServerProcess) -> None:
    # The seed's output_format default is PNG: the credit goes into iTXt chunks, and reads back the same.
    body = seed(stock_server, title="Harbour evenings").json()
    fetched = httpx.get(body["image_url"]).content
    assert body["images"][0]["media_type"] == "image/png"
    embedded = read_attribution(fetched)
    assert embedded is not None and embedded.model_dump(mode="json") == body["attribution"]
    assert body["metadata"]["query"] == "Harbour evenings"

    with httpx.Client(base_url=stock_server.url, timeout=60) as client:
        job = client.post(
            "/v1/jobs",
            json={"prompt": "harbour at dusk", "sources": ["stock", "generate"], "width": 96, "height": 64},
        ).json()
        done = wait_for(lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["finished_at"] and j)
    assert done["result"]["source"] == "stock" and done["result"]["images"][0]["width"] == 96
    assert done["result"]["attribution"]["credit_text"].startswith("Photo by ")


def test_no_results_generates_when_allowed_and_is_a_404_when_not(
    standin: StandIn, stock_server: ServerProcess
) -> None:
    body = seed(stock_server, keywords=["nothing like it"], use_generation=True, **QUICK).json()
    assert body["source"] == "generate" and body["attribution"] is None
    assert body["source_reason"].startswith("stock: no_results (Pexels has no photo for 'nothing like it'")
    assert [(a["source"], a["served"], a["reason"]) for a in body["attempts"]] == [
        ("stock", False, "no_results"),
        ("generate", True, "requested"),
    ]

    response = seed(stock_server, keywords=["nothing like it"])  # stock only
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["code"], error["reason"], error["field"]) == ("no_results", "no_results", "use_generation")
    assert "nothing like it" in error["message"] and error["attempts"][0]["source"] == "stock"


def test_pexels_5xx_with_both_flags_generates(standin: StandIn, stock_server: ServerProcess) -> None:
    standin.api_default = "500"
    body = seed(stock_server, keywords=["forest"], use_generation=True, **QUICK).json()
    assert body["source"] == "generate"
    assert body["source_reason"].startswith("stock: unavailable (Pexels /search answered 50")
    assert standin.api_calls == 3  # the first try and two retries
    assert metric(stock_server, 'imagesmith_pexels_errors_total{reason="unavailable"}') >= 1
    assert metric(stock_server, 'imagesmith_source_attempts_total{outcome="unavailable",source="stock"}') >= 1
    assert health(stock_server)["pexels_ok"] is True  # a passing outage does not block Pexels


def test_quota_spent_then_reset(standin: StandIn, stock_server: ServerProcess) -> None:
    # Pexels says Remaining=0 on this answer (which still has photos) and resets in a few seconds.
    standin.reset_epoch = int(time.time()) + 3
    standin.api_script = ["quota0"]
    first = seed(stock_server, keywords=["valley"]).json()
    assert first["source"] == "stock"

    report = health(stock_server)
    assert report["pexels_ok"] is False and report["status"] == "degraded"
    assert any(reason.startswith("stock photos unavailable: Pexels quota") for reason in report["reasons"])
    pexels = report["pexels"]
    assert pexels["blocked"] is True and pexels["quota"]["remaining"] == 0
    assert pexels["quota"]["limit"] == 200 and pexels["quota"]["blocked_until"]
    assert report["sources"]["stock"]["state"] == "blocked"
    assert metric(stock_server, "imagesmith_pexels_blocked") == 1.0
    assert metric(stock_server, "imagesmith_pexels_quota_remaining") == 0.0
    calls = standin.api_calls

    # A new query while blocked: generated, and the response says why and until when.
    body = seed(stock_server, keywords=["river"], use_generation=True, **QUICK).json()
    assert body["source"] == "generate"
    assert body["source_reason"].startswith("stock: quota_exhausted (Pexels quota exhausted")
    assert "calls resume at" in body["source_reason"] and body["attempts"][0]["retry_at"]
    # Stock only: a 503 with Retry-After; a cached query still serves.
    refused = seed(stock_server, keywords=["river"])
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "quota_exhausted"
    # One way of writing a time in one answer: the error's retry_at as its attempts' (it was "+00:00" beside "Z").
    error = refused.json()["error"]
    assert error["retry_at"] == error["attempts"][0]["retry_at"] and error["retry_at"].endswith("Z")
    assert 1 <= int(refused.headers["Retry-After"]) <= 5
    assert seed(stock_server, keywords=["valley"]).json()["source"] == "stock"
    assert standin.api_calls == calls  # nothing reached Pexels while blocked

    wait_for(lambda: health(stock_server)["pexels_ok"], timeout=10, interval=0.2)
    standin.remaining = standin.limit  # Pexels' new window
    again = seed(stock_server, keywords=["river"]).json()
    assert again["source"] == "stock" and standin.api_calls == calls + 1
    report = health(stock_server)
    assert report["pexels_ok"] is True and report["pexels"]["quota"]["remaining"] == 199


def test_a_slow_pexels_never_holds_up_a_generation_queued_behind_it(
    standin: StandIn, stock_server: ServerProcess
) -> None:
    """The worker ran a stock job's Pexels calls on its one thread: a generation queued behind a slow Pexels
    waited out every timeout and retry (30-90 s in a black-box session), the GPU idle meanwhile. Stock jobs now
    run on a lane of their own."""
    standin.api_default = "slow"
    standin.delay_s = 5.0  # past the server's 2 s timeout, on every try
    jobs = f"{stock_server.url}/v1/jobs"
    small = {"prompt": "a lake", "width": 64, "height": 64}
    stock_job = httpx.post(jobs, json={**small, "sources": ["stock"]}, timeout=30).json()
    wait_for(lambda: httpx.get(f"{jobs}/{stock_job['id']}").json()["status"] == "running", timeout=10)
    generation = httpx.post(jobs, json={**small, "sources": ["generate"], **QUICK}, timeout=30).json()

    done = wait_for(
        lambda: (job := httpx.get(f"{jobs}/{generation['id']}").json())["finished_at"] and job, timeout=60
    )
    assert done["status"] == "succeeded"
    assert httpx.get(f"{jobs}/{stock_job['id']}").json()["finished_at"] is None, "it waited for the stock job"
    ended = wait_for(
        lambda: (job := httpx.get(f"{jobs}/{stock_job['id']}").json())["finished_at"] and job, timeout=60
    )
    assert ended["status"] == "failed" and "Pexels" in ended["error"]["message"]


def test_a_stop_while_the_stock_lane_waits_on_pexels_keeps_the_job(
    standin: StandIn, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """SIGTERM while a stock job waits on a slow Pexels: the lane's job is put back (its attempt given back)
    and the next start serves it, as the GPU loop's running job is."""
    data_dir = tmp_path / "stock-stop"
    proc = server_factory(data_dir, **stock_env(standin)).start()
    standin.api_default = "slow"
    standin.delay_s = 5.0
    jobs = f"{proc.url}/v1/jobs"
    job = httpx.post(jobs, json={"prompt": "a lake", "sources": ["stock"], "width": 64, "height": 64}).json()
    wait_for(lambda: httpx.get(f"{jobs}/{job['id']}").json()["status"] == "running", timeout=10)
    proc.stop()

    standin.api_default = "ok"
    again = server_factory(data_dir, **stock_env(standin)).start()
    done = wait_for(
        lambda: (found := httpx.get(f"{again.url}/v1/jobs/{job['id']}").json())["finished_at"] and found,
        timeout=60,
    )
    assert done["status"] == "succeeded" and done["result"]["source"] == "stock", done
    assert done["attempts"] == 1, done


def test_bad_key_then_429_on_a_fresh_server(
    standin: StandIn, server_factory: Callable[..., ServerProcess]
) -> None:
    proc = server_factory(**stock_env(standin, imagesmith_pexels_quota_backoff_s="600")).start()

    # Pexels refuses the key: stock only is a clear JSON error, not a 500, and health stops claiming Pexels.
    standin.api_script = ["401"]
    response = seed(proc, keywords=["lake"])
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (error["code"], error["reason"]) == ("source_unavailable", "auth_failed")
    assert "refused the API key" in error["message"] and API_KEY not in response.text
    report = health(proc)
    assert report["pexels_ok"] is False and report["sources"]["stock"]["state"] == "failed"
    assert "Pexels refused the API key" in report["pexels"]["last_error"]
    refused = seed(proc, keywords=["lake"])  # refused at once now, naming the cause
    assert refused.status_code == 503 and "refused the API key" in refused.json()["error"]["message"]
    # ... and the field this endpoint has (it named /v1/jobs' `sources`, which the seed's request lacks).
    assert refused.json()["error"]["field"] == "use_generation"
    assert "use_generation=true would generate the image instead" in refused.json()["error"]["message"]

    # A 429 (Pexels sends no rate-limit headers with it): generated, and health shows Pexels blocked.
    standin.api_script = ["429"]
    body = seed(proc, keywords=["meadow"], use_generation=True, **QUICK).json()
    assert body["source"] == "generate" and body["source_reason"].startswith("stock: quota_exhausted")
    report = health(proc)
    assert report["pexels_ok"] is False and report["status"] == "degraded"
    assert report["pexels"]["blocked"] is True
    assert report["pexels"]["quota"]["blocked_reason"] == "429 Too Many Requests"
    assert metric(proc, "imagesmith_pexels_blocked") == 1.0
