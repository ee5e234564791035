"""The seed's API over real HTTP: its curl example as written, health, and the stock-only error."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import httpx
import pytest
from PIL import Image
from service_helpers import ServerProcess

from imagesmith.engine.output import parse_a1111_parameters, read_parameters

# The seed's documented example (SDXL_REFINEMENT code changes, "Test 3: API Call"), host and port aside.
SEED_CURL_BODY = """{
    "prompt": "test image",
    "use_generation": true,
    "use_refinement": true
  }"""


def test_seed_curl_example_end_to_end(server: ServerProcess) -> None:
    # The seed's example is a curl command: run it with curl (.ci/run installs curl where it is missing).
    assert shutil.which("curl"), "the curl binary is needed: apt-get install curl"
    done = subprocess.run(
        [
            "curl", "-s", "-X", "POST", f"{server.url}/api/media/generate-image",
            "-H", "Content-Type: application/json",
            "-d", SEED_CURL_BODY,
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    body = json.loads(done.stdout)
    assert body["success"] is True, body
    assert body["source"] == "generate"
    meta = body["metadata"]
    # The seed's defaults: 50 steps in all, guidance 8.0, refiner on.
    assert meta["request"]["num_inference_steps"] == 50
    assert meta["request"]["guidance_scale"] == 8.0
    assert meta["refined"] is True
    assert [stage["name"] for stage in meta["stages"]] == ["base", "refine", "decode"]

    fetched = httpx.get(body["image_url"])
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    assert "immutable" in fetched.headers["cache-control"]
    image = Image.open(io.BytesIO(fetched.content))
    image.load()
    assert image.size == (64, 64)
    params = parse_a1111_parameters(read_parameters(fetched.content) or "")
    assert params["prompt"] == "test image"
    assert params["Seed"] == str(meta["seeds"][0])

    # The URL is stable and cache-friendly: a conditional GET is a 304.
    again = httpx.get(body["image_url"], headers={"If-None-Match": fetched.headers["etag"]})
    assert again.status_code == 304
    # ... whatever form a cache sends the tag in: weak, in a list, or '*' (each was a 200 with the bytes).
    etag = fetched.headers["etag"]
    for held in (f"W/{etag}", f'"other", {etag}', "*"):
        assert httpx.get(body["image_url"], headers={"If-None-Match": held}).status_code == 304, held
    assert httpx.get(body["image_url"], headers={"If-None-Match": '"other"'}).status_code == 200
    # HEAD answers with the headers (it was a 405); a Range it cannot parse gets the whole file (it was a
    # plain-text 400); a satisfiable one its bytes.
    head = httpx.head(body["image_url"])
    assert head.status_code == 200 and head.headers["content-length"] == str(len(fetched.content))
    assert not head.content
    whole = httpx.get(body["image_url"], headers={"Range": "bytes=abc"})
    assert whole.status_code == 200 and whole.content == fetched.content
    part = httpx.get(body["image_url"], headers={"Range": "bytes=0-7"})
    assert part.status_code == 206 and part.content == fetched.content[:8]
    beyond = httpx.get(body["image_url"], headers={"Range": f"bytes={len(fetched.content) + 10}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(fetched.content)}"
    assert beyond.json()["error"]["code"] == "range_not_satisfiable"  # JSON, like every other error


def test_seed_fields_and_new_fields(server: ServerProcess) -> None:
    with server.client() as client:
        response = client.post(
            "/api/media/generate-image",
            json={
                "prompt": "a red bicycle",
                "title": "Cycling",
                "keywords": ["bike"],
                "use_generation": True,
                "use_refinement": False,
                "num_inference_steps": 20,
                "guidance_scale": 5.0,
                "width": 128,
                "height": 64,
                "seed": 7,
                "num_images": 2,
                "output_format": "webp",
                "scheduler": "dpmpp_2m",
                "some_unknown_field": "ignored, as the seed's model did",
            },
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["image_urls"]) == 2
    assert body["metadata"]["seeds"] == [7, 8]
    assert body["metadata"]["refined"] is False
    assert all(image["media_type"] == "image/webp" and image["width"] == 128 for image in body["images"])


def test_health_keeps_seed_fields(server: ServerProcess) -> None:
    body = httpx.get(f"{server.url}/api/media/health").json()
    assert body["status"] == "ready"
    assert body["sdxl_ok"] is True
    assert body["pexels_ok"] is False  # no Pexels key on this server: honest
    assert body["device"] == "cpu"
    assert body["models"]["refiner_status"] == "loaded"
    assert {"depth", "running", "max"} <= set(body["queue"])
    startup = body["startup"]
    assert startup["load_s"] > 0 and startup["ready_after_process_start_s"] >= startup["load_s"]


def test_stock_only_request_says_stock_is_not_configured(server: ServerProcess) -> None:
    # The seed's defaults: use_pexels=true, use_generation=false.
    response = httpx.post(f"{server.url}/api/media/generate-image", json={"prompt": "a lighthouse"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "stock_not_configured"
    assert error["field"] == "use_generation" and "set use_generation=true" in error["message"]
    # The same refusal on /v1/jobs, which has no use_generation: said in its own field.
    response = httpx.post(f"{server.url}/v1/jobs", json={"prompt": "a lighthouse", "sources": ["stock"]})
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["field"]) == (422, "stock_not_configured", "sources")
    assert 'add "generate" to sources' in error["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "x", "use_generation": True, "num_inference_steps": 19}, "num_inference_steps"),
        ({"prompt": "x", "use_generation": True, "guidance_scale": 25}, "guidance_scale"),
        ({"prompt": "x", "use_generation": True, "title": "t" * 201}, "title"),
        ({"prompt": "x", "keywords": [f"k{number}" for number in range(21)]}, "keywords"),  # as /v1/jobs
        ({"prompt": "x", "use_generation": True, "width": 1001}, "width"),
        ({"prompt": "   ", "use_generation": True}, "prompt"),
        ({"prompt": "x", "use_pexels": False}, "use_generation"),
        ({"prompt": "x", "use_generation": True, "aspect": "wide", "width": 64}, "aspect"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    server: ServerProcess, body: dict[str, object], field: str
) -> None:
    response = httpx.post(f"{server.url}/api/media/generate-image", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert error["message"]


BODY_FIX = "send a JSON object encoded as UTF-8, with Content-Type: application/json"


@pytest.mark.parametrize(
    ("method", "path", "allowed", "said"),
    [
        # Two routes at one path: Starlette's Allow named POST alone. HEAD is in Allow, not in the message.
        ("DELETE", "/v1/jobs", "GET, HEAD, POST", "GET or POST"),
        ("GET", "/api/media/generate-image", "POST", "POST"),
        ("POST", "/metrics", "GET, HEAD", "GET"),
        ("DELETE", "/sdapi/v1/options", "GET, POST", "GET or POST"),
    ],
)
def test_a_method_a_path_does_not_take_is_told_the_ones_it_does(
    server: ServerProcess, method: str, path: str, allowed: str, said: str
) -> None:
    response = httpx.request(method, f"{server.url}{path}")
    assert response.status_code == 405 and response.headers["allow"] == allowed, response.text
    message = response.json()["detail"] if path.startswith("/sdapi") else response.json()["error"]["message"]
    assert message == f"{path} takes {said}, not {method}"


def test_an_unknown_path_names_where_the_routes_are(server: ServerProcess) -> None:
    """An A1111 client calling a route this server lacks (img2img) hears which A1111 routes there are."""
    a1111 = httpx.post(f"{server.url}/sdapi/v1/img2img", json={"prompt": "x"})
    assert a1111.status_code == 404, a1111.text
    assert a1111.json()["detail"].startswith("/sdapi/v1/img2img is not served here; the AUTOMATIC1111 routes")
    assert "POST /sdapi/v1/txt2img" in a1111.json()["detail"]
    ours = httpx.get(f"{server.url}/v1/nothing-here")
    assert ours.status_code == 404
    assert (
        ours.json()["error"]["message"] == "no route /v1/nothing-here; the API's routes are listed at /docs"
    )


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"prompt": ', "application/json"),  # malformed JSON
        (b'{"prompt": "\xff"}', "application/json"),  # not UTF-8: FastAPI's own 400 "error parsing the body"
        (b'{"prompt": "x"}', "text/plain"),  # a JSON object, but not sent as JSON
        (b"prompt=x", "application/x-www-form-urlencoded"),
        (b"", "application/json"),
        (b'["prompt"]', "application/json"),  # JSON, not an object
    ],
)
@pytest.mark.parametrize(
    "path", ["/api/media/generate-image", "/v1/jobs", "/v1/images/generations", "/sdapi/v1/txt2img"]
)
def test_a_body_that_is_not_a_json_object_is_refused_naming_the_body(
    server: ServerProcess, path: str, content: bytes, content_type: str
) -> None:
    """Each route, each dialect: the field is the body (not a character offset, not "request"), and the
    message says what to send, where a 400 "bad_request" without a field or a "Field required" used to be."""
    response = httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": content_type})
    body = response.json()
    if path.startswith("/v1/images"):  # OpenAI's error object: 400 for bad parameters
        assert response.status_code == 400 and body["error"]["param"] == "body", body
        message = body["error"]["message"]
    elif path.startswith("/sdapi"):
        assert response.status_code == 422 and body["field"] == "body", body
        message = body["detail"]
    else:
        assert response.status_code == 422 and body["error"]["code"] == "invalid_request", body
        assert body["error"]["field"] == "body", body
        message = body["error"]["message"]
    assert BODY_FIX in message, message
    if (
        content == b'{"prompt": '
    ):  # a JSON syntax error also says what and where, where it said "JSON decode error"
        assert "the request body is not valid JSON: Expecting value at character 11" in message, message
    if content_type != "application/json":  # curl's -d sends a form: the message names what came
        assert f"the request body came as Content-Type: {content_type}, not JSON" in message, message


def test_a_seed_draft_left_to_its_default_steps_runs_the_drafts_30(server: ServerProcess) -> None:
    """The seed documents high_quality as "50 base steps + 30 refinement steps (vs 30 base steps)"; its 50 is the
    high-quality default, and a draft ran 50 here while /v1/jobs and OpenAI's "standard" ran 30."""
    body = {"prompt": "draft", "use_generation": True, "use_pexels": False, "high_quality": False}
    draft = httpx.post(f"{server.url}/api/media/generate-image", json=body, timeout=120).json()
    assert draft["metadata"]["request"]["num_inference_steps"] == 30
    assert [stage["name"] for stage in draft["metadata"]["stages"]] == ["base", "decode"]
    chosen = httpx.post(
        f"{server.url}/api/media/generate-image", json={**body, "num_inference_steps": 50}, timeout=120
    ).json()
    assert chosen["metadata"]["request"]["num_inference_steps"] == 50  # steps the client names are kept


@pytest.mark.parametrize("field_value", [b'"foo": NaN', b'"foo": {"a": [1, Infinity]}'])
def test_nan_and_infinity_are_refused_in_fields_this_route_ignores(
    server: ServerProcess, field_value: bytes
) -> None:
    """The seed endpoint ignores unknown fields, and took NaN in one (a 200 and an image) where every other
    route refuses it, as the docs say."""
    body = b'{"prompt": "a fox", "use_pexels": false, "use_generation": true, ' + field_value + b"}"
    response = httpx.post(
        f"{server.url}/api/media/generate-image", content=body, headers={"Content-Type": "application/json"}
    )
    error = response.json()["error"]
    assert response.status_code == 422 and error["field"] == "foo", error
    assert "NaN or Infinity, which JSON does not have" in error["message"], error
