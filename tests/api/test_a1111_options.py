"""POST /sdapi/v1/options, as AUTOMATIC1111 clients send it (webuiapi's set_options and util_set_model), against
a real server on the tiny model: the model served may be named, another is refused with the fix, other options
are accepted and change nothing."""

from __future__ import annotations

import time

import httpx
import webuiapi
from service_helpers import ServerProcess


def set_options(server: ServerProcess, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/sdapi/v1/options", json=body, timeout=30)


def test_naming_the_model_served_is_accepted_and_changes_nothing(server: ServerProcess) -> None:
    before = httpx.get(f"{server.url}/sdapi/v1/options").json()
    base = httpx.get(f"{server.url}/sdapi/v1/sd-models").json()[0]
    for name in (base["title"], f"{base['title']} [31e35c80fc]", base["filename"]):
        response = set_options(server, {"sd_model_checkpoint": name})
        assert response.status_code == 200 and response.json() is None, (name, response.text)
    assert httpx.get(f"{server.url}/sdapi/v1/options").json() == before
    # webuiapi's own calls: they take the answer as A1111's.
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert api.set_options({"sd_model_checkpoint": base["title"]}) is None
    api.util_set_model(base["title"])
    assert api.util_get_current_model() == before["sd_model_checkpoint"]


def test_another_model_is_refused_naming_the_field_and_the_fix(server: ServerProcess) -> None:
    before = httpx.get(f"{server.url}/sdapi/v1/options").json()
    models = httpx.get(f"{server.url}/sdapi/v1/sd-models").json()
    served, refiner = models[0]["title"], models[1]["title"]  # the tiny preset has a refiner
    for name in ("sd_xl_base_1.0.safetensors [31e35c80fc]", refiner, f"{refiner} [0123456789]"):
        response = set_options(server, {"sd_model_checkpoint": name})
        error = response.json()  # A1111's shape: {error, detail, body, errors}, and the field
        assert response.status_code == 422 and error["field"] == "sd_model_checkpoint", (name, error)
        assert error["error"] == "invalid_request" and error["detail"] == error["errors"], error
        assert served in error["detail"] and "IMAGESMITH_BASE_MODEL" in error["detail"], error
        assert "restart" in error["detail"], error
    assert "refiner_checkpoint" in set_options(server, {"sd_model_checkpoint": refiner}).json()["detail"]
    assert httpx.get(f"{server.url}/sdapi/v1/options").json() == before


def test_other_options_are_accepted_and_the_changed_ones_logged(server: ServerProcess) -> None:
    before = httpx.get(f"{server.url}/sdapi/v1/options").json()
    body = {
        "CLIP_stop_at_last_layers": 2,  # differs
        "samples_format": before["samples_format"],  # as it is: not worth a warning
        "sd_vae": "sdxl_vae.safetensors",  # differs
        "some_extension_option": True,  # not one of ours at all
    }
    response = set_options(server, body)
    assert response.status_code == 200 and response.json() is None, response.text
    assert httpx.get(f"{server.url}/sdapi/v1/options").json() == before
    expected = "ignoring CLIP_stop_at_last_layers, sd_vae, some_extension_option"
    deadline = time.monotonic() + 10
    while expected not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in server.log.read_text().splitlines() if "/sdapi/v1/options: ignoring" in line]
    assert any(expected in line for line in lines), lines
    assert not any("samples_format" in line for line in lines), lines
    # Only values as they are: no warning.
    assert set_options(server, {"samples_format": before["samples_format"]}).status_code == 200


def test_a_body_that_is_not_a_json_object_is_refused_naming_the_body(server: ServerProcess) -> None:
    for content in (b'["sd_model_checkpoint", "x"]', b'"x"', b"null"):
        response = httpx.post(
            f"{server.url}/sdapi/v1/options", content=content, headers={"Content-Type": "application/json"}
        )
        error = response.json()
        assert response.status_code == 422 and error["field"] == "body", (content, error)
        assert "not a JSON object" in error["detail"], error


def test_a_null_model_is_no_change_and_a_value_that_is_no_name_is_refused_as_such(
    server: ServerProcess,
) -> None:
    before = httpx.get(f"{server.url}/sdapi/v1/options").json()
    response = set_options(server, {"sd_model_checkpoint": None})  # A1111: null changes nothing
    assert response.status_code == 200 and response.json() is None, response.text
    for value in (5, ["a"], {"title": "x"}):
        error = set_options(server, {"sd_model_checkpoint": value}).json()
        assert error["field"] == "sd_model_checkpoint" and "must be a string" in error["detail"], (
            value,
            error,
        )
        assert "/sdapi/v1/sd-models" in error["detail"], error
    assert httpx.get(f"{server.url}/sdapi/v1/options").json() == before


def test_nan_or_infinity_is_refused_in_any_option_as_on_every_other_route(server: ServerProcess) -> None:
    for content, field in (
        (b'{"x": NaN}', "x"),
        (b'{"samples_format": "png", "eta": {"d": [Infinity]}}', "eta"),
    ):
        response = httpx.post(
            f"{server.url}/sdapi/v1/options", content=content, headers={"Content-Type": "application/json"}
        )
        error = response.json()
        assert response.status_code == 422, (content, response.text)
        assert error["field"] == field and "NaN or Infinity" in error["detail"], error
