"""The OpenAI Images API through the official `openai` client, against a real server on the tiny model."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import httpx
import openai
import pytest
from PIL import Image
from service_helpers import ServerProcess

from imagesmith.config import Settings
from imagesmith.engine.output import parse_a1111_parameters, read_parameters


def client_for(server: ServerProcess, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def test_generate_url_and_b64_json(server: ServerProcess) -> None:
    client = client_for(server)
    # size left out: the server's default (64x64 here); "standard" is the draft preset (base only).
    response = client.images.generate(
        model="dall-e-3", prompt="a lighthouse at dawn", n=2, quality="standard", response_format="url"
    )
    assert isinstance(response.created, int) and response.created > 0
    assert response.data is not None and len(response.data) == 2
    seeds = []
    for item in response.data:
        assert item.b64_json is None and item.revised_prompt == "a lighthouse at dawn"
        assert item.url is not None and item.url.startswith(f"{server.url}/v1/images/")
        assert item.url.endswith(".png")
        fetched = httpx.get(item.url)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
        params = parse_a1111_parameters(read_parameters(fetched.content) or "")
        assert params["Steps"] == "30" and params["Refine mode"] == "none"
        seeds.append(int(params["Seed"]))
    assert seeds[1] == seeds[0] + 1

    # "hd" is the high-quality preset: 40 steps with the refiner. style and user are accepted.
    b64 = client.images.generate(
        model="gpt-image-1",
        prompt="a red bicycle",
        quality="hd",
        style="vivid",
        user="blog-42",
        size="auto",
    )
    assert b64.data is not None and len(b64.data) == 1
    raw = base64.b64decode(b64.data[0].b64_json or "")
    # No response_format: gpt-image models get b64_json, as OpenAI answers them (its clients read that).
    assert raw.startswith(b"\x89PNG") and b64.data[0].url is None
    params = parse_a1111_parameters(read_parameters(raw) or "")
    assert params["prompt"] == "a red bicycle"
    assert params["Steps"] == "40" and params["Refine mode"] == "ensemble"


def test_errors_are_openai_shaped(server: ServerProcess) -> None:
    client = client_for(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", size="512x512")
    error = caught.value
    assert error.status_code == 400
    body = error.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and body["param"] == "size"
    assert "1024x1024" in body["message"] and "1216x832" in body["message"]

    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", n=5)
    assert caught.value.response.json()["error"]["param"] == "n"

    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", response_format="base64")  # type: ignore[arg-type]
    assert caught.value.response.json()["error"]["param"] == "response_format"

    with httpx.Client(base_url=server.url) as raw:
        missing = raw.post("/v1/images/generations", json={"n": 1})
        assert missing.status_code == 400
        assert missing.json()["error"]["param"] == "prompt"
        # One code for a bad parameter, whether the schema or the mapping refused it (was invalid_request).
        assert missing.json()["error"]["code"] == "invalid_value"
        blank = raw.post("/v1/images/generations", json={"prompt": "   "})
        assert blank.status_code == 400 and blank.json()["error"]["param"] == "prompt"
        gif = raw.post("/v1/images/generations", json={"prompt": "a fox", "output_format": "gif"})
        assert gif.status_code == 400 and gif.json()["error"]["param"] == "output_format"
        background = raw.post("/v1/images/generations", json={"prompt": "a fox", "background": "purple"})
        assert background.status_code == 400 and background.json()["error"]["param"] == "background"
        # Types as strict as OpenAI's: n=true was taken as 1, and stream="yes" as a request to stream.
        for name, value in (("n", True), ("n", "2"), ("stream", "yes")):
            typed = raw.post("/v1/images/generations", json={"prompt": "a fox", name: value})
            assert typed.status_code == 400 and typed.json()["error"]["param"] == name, typed.text
            assert "streaming is not supported" not in typed.text
        # A GET of a POST route is a 405 saying so (it was the image route's 404 "no such image"); edits and
        # variations are said to be unsupported (they were a 405).
        got = raw.get("/v1/images/generations")
        assert got.status_code == 405 and got.headers["allow"] == "POST"
        for method in ("PUT", "DELETE"):  # the same Allow: it said "GET, HEAD, POST", from the image route
            other_method = raw.request(method, "/v1/images/generations")
            assert other_method.status_code == 405 and other_method.headers["allow"] == "POST", method
            assert "takes POST, not" in other_method.json()["error"]["message"]
        for path in ("/v1/images/edits", "/v1/images/variations"):
            refused = raw.post(path, json={"prompt": "a fox"})
            assert refused.status_code == 404, refused.text
            assert refused.json()["error"]["code"] == "not_supported"
        # The rest of the service keeps its own error shape.
        other = raw.get("/v1/jobs/nope").json()["error"]
        assert other["code"] == "not_found" and "field" in other and "type" not in other


def test_output_format_and_idempotent_retry(server: ServerProcess) -> None:
    body = {"prompt": "a fox", "quality": "low", "output_format": "webp", "response_format": "url"}
    headers = {"Idempotency-Key": "openai-retry-1"}
    with httpx.Client(base_url=server.url, timeout=120) as raw:
        webp = raw.post("/v1/images/generations", json=body, headers=headers)
        assert webp.status_code == 200, webp.text
        assert webp.json()["data"][0]["url"].endswith(".webp")
        # A retry with the same key is answered from the same job, not a second one.
        again = raw.post("/v1/images/generations", json=body, headers=headers)
        assert again.json() == webp.json()


def test_bearer_keys_apply(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(imagesmith_api_keys="k1").start()
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(server, "wrong").images.generate(prompt="a fox")
    body = caught.value.response.json()["error"]
    assert body["code"] == "invalid_api_key" and body["type"] == "invalid_request_error"
    response = client_for(server, "k1").images.generate(prompt="a fox", quality="standard")
    assert response.data is not None and response.data[0].url
    # The image URL downloads without a key, as OpenAI's do (an unguessable, content-addressed name).
    assert httpx.get(response.data[0].url).status_code == 200


def test_a_server_limit_names_the_openai_parameter(server_factory: Callable[..., ServerProcess]) -> None:
    """The service's own limits are checked after the mapping, in its field names: `width` was the param and
    `num_images` in the message, neither of which an OpenAI client sends."""
    server = server_factory(imagesmith_max_total_pixels="1000000").start()
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).images.generate(prompt="a fox", size="1024x1024")
    body = caught.value.response.json()["error"]
    assert body["param"] == "size" and body["message"].endswith("lower the size or n"), body
    assert "num_images" not in body["message"] and "width" not in body["message"]


def test_the_model_list_names_the_servers_model_as_openai_does(server: ServerProcess) -> None:
    """Front-ends list the models first: /v1/models was a 404 in the service's own error format."""
    client = client_for(server)
    listed = client.models.list()
    assert [model.id for model in listed.data] == ["imagesmith-sdxl"]
    assert listed.data[0].object == "model" and listed.data[0].owned_by == "imagesmith"
    assert client.models.retrieve("imagesmith-sdxl").id == "imagesmith-sdxl"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found" and error["param"] == "model"
    # The listed name generates, as any name does.
    image = client.images.generate(model=listed.data[0].id, prompt="a fox", quality="standard")
    assert image.data and (image.data[0].url or image.data[0].b64_json)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "a fox", "output_compression": NaN}', "output_compression"),  # a field ignored here
        (b'{"prompt": "a fox", "guidance_scale": Infinity}', "guidance_scale"),
        (b'{"prompt": "a fox", "extra": {"a": [1, -Infinity]}}', "extra"),
    ],
)
def test_nan_and_infinity_are_refused_naming_the_param(
    server: ServerProcess, body: bytes, param: str
) -> None:
    """JSON has neither; Python's reader takes both, and this route, which ignores fields it does not read,
    answered them with a 200 and an image where every other route refuses them."""
    response = httpx.post(
        f"{server.url}/v1/images/generations", content=body, headers={"Content-Type": "application/json"}
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param, error
    assert "NaN or Infinity, which JSON does not have" in error["message"], error


def test_a_long_wait_answers_before_the_clients_timeout_so_it_does_not_resubmit(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """The official client times out at 600 s and then sends the request again, twice by default, each try a new
    job: the server waited 900 s, so one call made three jobs (a black-box finding). The server now answers
    first, with a 504 the client does not retry; here both scaled down, the client's timeout above the wait."""
    assert Settings().openai_wait_timeout_s < openai.DEFAULT_TIMEOUT.read  # type: ignore[operator]
    server = server_factory(imagesmith_openai_wait_timeout_s="1").start()
    with server.client() as http:
        blocker = {"prompt": "a long one first", "sources": ["generate"], "width": 256, "height": 256}
        blocking = http.post("/v1/jobs", json={**blocker, "num_inference_steps": 150}).json()["id"]
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=30)  # retries: 2
            with pytest.raises(openai.APIStatusError) as caught:
                client.images.generate(prompt="asked once", quality="low")
            assert caught.value.status_code == 504
            assert caught.value.response.headers["x-should-retry"] == "false"
            jobs = http.get("/v1/jobs", params={"limit": 10}).json()["jobs"]
            asked = [job for job in jobs if job["request"]["generation"]["prompt"] == "asked once"]
            assert len(asked) == 1, asked  # one call, one job: the client did not send it again
            assert caught.value.response.json()["error"]["message"].endswith(
                f"(GET /v1/jobs/{asked[0]['id']})"
            )
        finally:
            http.post(f"/v1/jobs/{blocking}/cancel")
