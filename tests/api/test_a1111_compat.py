"""The AUTOMATIC1111 API through webuiapi (a client written for A1111) and raw HTTP shaped like its requests,
against a real server on the tiny model."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image
from service_helpers import ServerProcess

from imagesmith.api.a1111_mapping import Txt2ImgRequest
from imagesmith.engine.output import parse_a1111_parameters, read_parameters


def api_for(server: ServerProcess) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def test_webuiapi_txt2img(server: ServerProcess) -> None:
    api = api_for(server)
    result = api.txt2img(
        prompt="a lighthouse at dawn",
        negative_prompt="blurry",
        seed=1234,
        steps=20,
        cfg_scale=6.0,
        width=64,
        height=96,
        batch_size=2,
        sampler_name="DPM++ 2M",
        scheduler="Karras",  # newer A1111: sampler and schedule apart
        override_settings={"sd_model_checkpoint": "whatever", "CLIP_stop_at_last_layers": 2},
    )
    assert len(result.images) == 2
    assert all(image.size == (64, 96) for image in result.images)
    info = result.info
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235]
    assert info["sampler_name"] == "DPM++ 2M Karras"
    assert info["steps"] == 20 and info["cfg_scale"] == 6.0 and info["negative_prompt"] == "blurry"
    assert (info["width"], info["height"]) == (64, 96)
    # webuiapi sends no refiner_checkpoint: imagesmith's default, the refiner ensemble, and info says so.
    assert info["extra_generation_params"]["Refiner switch at"] == 0.8
    assert "Seed: 1235" in info["infotexts"][1]
    assert result.parameters["prompt"] == "a lighthouse at dawn" and result.parameters["steps"] == 20
    # The PNGs carry the same parameters text A1111's PNG Info reads.
    raw = base64.b64decode(result.json["images"][0])
    params = parse_a1111_parameters(read_parameters(raw) or "")
    assert params["Seed"] == "1234" and params["Sampler"] == "DPM++ 2M Karras"


def txt2img(server: ServerProcess, **fields: Any) -> httpx.Response:
    body = {"prompt": "a fox", "steps": 20, "width": 64, "height": 64, **fields}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        return client.post("/sdapi/v1/txt2img", json=body)


def test_raw_txt2img_seed_refiner_and_batches(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url) as client:
        models = client.get("/sdapi/v1/sd-models").json()
    refiner = models[-1]["title"]
    ensemble = txt2img(
        server, seed=-1, n_iter=2, refiner_checkpoint=refiner, refiner_switch_at=0.7, sampler_name="Euler a"
    )
    assert ensemble.status_code == 200, ensemble.text
    body = ensemble.json()
    assert len(body["images"]) == 2 and isinstance(body["info"], str)
    info = httpx.Response(200, content=body["info"]).json()
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert info["sampler_name"] == "Euler a"
    assert info["extra_generation_params"] == {"Refiner": refiner, "Refiner switch at": 0.7}
    base_only = txt2img(server, refiner_checkpoint="None", send_images=False)
    assert base_only.status_code == 200 and base_only.json()["images"] == []
    base_info = httpx.Response(200, content=base_only.json()["info"]).json()
    assert base_info["extra_generation_params"] == {}
    assert "Refine mode: none" in base_info["infotexts"][0]


def test_null_in_any_field_is_its_default(server: ServerProcess) -> None:
    """A1111's request fields are all Optional and JS/TS and generated clients send null for unset ones: null
    means the field's default, as if the key were absent (seed null is random); a wrong type is still refused."""
    size = {"width": 64, "height": 64, "steps": 4}
    # refiner_checkpoint aside: its null is A1111's "no refiner" (test_compat_mapping.py holds it to that).
    nulls = {name: None for name in Txt2ImgRequest.model_fields if name not in {*size, "refiner_checkpoint"}}
    assert {"seed", "negative_prompt", "batch_size", "n_iter", "enable_hr", "send_images"} <= set(nulls)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        sent_null = client.post("/sdapi/v1/txt2img", json={**nulls, "prompt": "cat", **size})
        absent = client.post("/sdapi/v1/txt2img", json={"prompt": "cat", **size})
        wrong_type = client.post("/sdapi/v1/txt2img", json={"prompt": "cat", **size, "seed": "random"})
    assert sent_null.status_code == 200, sent_null.text
    assert absent.status_code == 200, absent.text
    body = sent_null.json()
    assert len(body["images"]) == 1  # send_images null: sent, as by default
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.format == "PNG" and image.size == (64, 64)
    info = httpx.Response(200, content=body["info"]).json()
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]  # drawn at random, as for -1
    assert info["subseed"] == -1 and info["subseed_strength"] == 0.0 and info["batch_size"] == 1
    assert body["parameters"]["seed"] == -1 and body["parameters"]["send_images"] is True
    # Everything else is what the same request without those keys gets (the seed is drawn anew each time).
    drawn = ("seed", "all_seeds", "infotexts", "job_timestamp")
    absent_info = httpx.Response(200, content=absent.json()["info"]).json()
    assert {k: v for k, v in info.items() if k not in drawn} == {
        k: v for k, v in absent_info.items() if k not in drawn
    }
    assert body["parameters"] == absent.json()["parameters"]
    assert wrong_type.status_code == 422 and wrong_type.json()["field"] == "seed", wrong_type.text


def test_errors_name_the_field_and_valid_values(server: ServerProcess) -> None:
    api = api_for(server)
    with pytest.raises(RuntimeError) as caught:
        api.txt2img(prompt="a fox", sampler_name="Heun", width=64, height=64, steps=20)
    assert caught.value.args[0] == 422
    assert "Euler a" in caught.value.args[1] and "DPM++ 2M Karras" in caught.value.args[1]

    odd = txt2img(server, width=100)
    assert odd.status_code == 422
    error = odd.json()
    assert error["field"] == "width" and "multiple of 8" in error["detail"] and "104" in error["detail"]
    assert set(error) >= {"error", "detail", "body", "errors"}
    too_many = txt2img(server, batch_size=3, n_iter=2)
    assert too_many.status_code == 422 and too_many.json()["field"] == "batch_size"
    karras_euler = txt2img(server, sampler_name="Euler", scheduler="Karras")
    assert karras_euler.status_code == 422 and karras_euler.json()["field"] == "scheduler"
    steps = txt2img(server, steps=0)
    assert steps.status_code == 422 and steps.json()["field"] == "steps"
    seed = txt2img(server, seed=-2).json()  # -1 is A1111's random: the bound says so (it said 0)
    assert seed["field"] == "seed" and "greater than or equal to -1" in seed["detail"], seed
    # The request's own checks and the service's (the loaded model's split) speak A1111's names, in the
    # field and in the message: steps and refiner_switch_at, not num_inference_steps and high_noise_frac.
    one_step = txt2img(server, steps=1).json()
    assert one_step["field"] == "steps", one_step
    assert one_step["detail"].endswith("at refiner_switch_at 0.8 (the default) leave the base or the refiner no "
                                       "step; raise steps to 2 or more")  # fmt: skip
    # Naming a refiner without a switch point is the default split, not one the client chose.
    named = txt2img(server, steps=1, refiner_checkpoint="sd_xl_refiner_1.0").json()
    assert named["field"] == "steps", named
    dpm = txt2img(server, steps=4, sampler_name="DPM++ 2M")
    assert dpm.status_code == 422 and dpm.json()["field"] == "refiner_switch_at", dpm.text
    assert "raise steps to 5 or more, or move refiner_switch_at" in dpm.json()["detail"], dpm.text


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        (b'{"prompt": "a fox", "subseed_strength": NaN}', "subseed_strength", "finite number"),
        (b'{"prompt": "a fox", "denoising_strength": Infinity}', "denoising_strength", "denoising_strength is NaN"),
        (b'{"prompt": "a fox", "override_settings": {"a": [1, -Infinity]}}', "override_settings",
         "override_settings.a[1] is NaN or Infinity"),
        # 300 levels: the job ran, then echoing the field back failed (a 500, and a second job on a retry).
        (b'{"prompt": "a fox", "foo": ' + b"[" * 300 + b"]" * 300 + b"}", "foo", "more than 32 levels deep"),
    ],
)  # fmt: skip
def test_nan_and_infinity_are_refused_naming_the_field(
    server: ServerProcess, body: bytes, field: str, says: str
) -> None:
    """Python's JSON reader takes them; echoed back in `info` they made JSON that strict parsers refuse."""
    jobs_before = httpx.get(f"{server.url}/v1/jobs").json()["total"]
    response = httpx.post(
        f"{server.url}/sdapi/v1/txt2img", content=body, headers={"Content-Type": "application/json"}
    )
    error = response.json()
    assert response.status_code == 422 and error["field"] == field, error
    assert says in error["detail"], error
    assert httpx.get(f"{server.url}/v1/jobs").json()["total"] == jobs_before  # refused before any job


def test_lists_clients_read(server: ServerProcess) -> None:
    api = api_for(server)
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC"} == set(
        api.util_get_sampler_names()
    )
    assert "karras" in api.util_get_scheduler_names()
    titles = api.util_get_model_names()
    assert titles and api.util_get_current_model() in titles
    assert api.get_options()["samples_format"] == "png"
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None


def test_progress_and_interrupt_of_a_running_txt2img(server: ServerProcess) -> None:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = api_for(server).txt2img(
                prompt="a slow fox", width=128, height=128, steps=150, seed=5
            )
        except Exception as error:  # reported below
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    monitor = api_for(server)
    deadline = time.monotonic() + 60
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        now = monitor.get_progress()
        if now["state"]["sampling_step"] > 0:
            seen.append(now)
        if len(seen) >= 2 and now["current_image"]:
            break
        time.sleep(0.1)
    assert seen and now["current_image"], "no progress with a preview seen"
    assert 0 < now["progress"] < 1 and now["eta_relative"] > 0
    assert now["state"]["sampling_steps"] > 0 and now["state"]["job_count"] == 1
    assert now["textinfo"].startswith("base")
    assert seen[-1]["progress"] >= seen[0]["progress"]
    preview = Image.open(io.BytesIO(base64.b64decode(now["current_image"])))
    assert preview.format == "PNG" and preview.size == (16, 16)  # latents are 1/8 scale

    assert monitor.interrupt() == {}
    worker.join(60)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.images == [] and result.info["interrupted"] is True
    with httpx.Client(base_url=server.url) as client:
        job = client.get(f"/v1/jobs/{result.info['job_id']}").json()
    assert job["status"] == "canceled"
    assert monitor.get_progress()["state"]["job_count"] == 0


def test_bearer_keys_apply(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(imagesmith_api_keys="k1").start()
    refused = httpx.get(f"{server.url}/sdapi/v1/progress")
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    assert "Bearer" in refused.json()["detail"]
    api = api_for(server)
    api.session.headers["Authorization"] = "Bearer k1"
    assert api.get_progress()["progress"] == 0
    result = api.txt2img(prompt="a fox", width=64, height=64, steps=20)
    assert len(result.images) == 1


def test_progress_shows_the_pass_on_the_gpu_before_one_being_stored() -> None:
    """A job whose pass is done stays live while its images are stored, as the next pass runs."""
    from imagesmith.api.a1111 import shown_job

    assert shown_job(["stored", "running"], {"running"}, []) == "running"
    assert shown_job(["stored", "running"], {"running"}, ["stored"]) == "stored"  # ours first, even if done
    assert shown_job(
        ["a", "ours-running", "ours-stored"], {"a", "ours-running"}, ["ours-stored", "ours-running"]
    ) == ("ours-running")
    assert shown_job(["stored"], set(), []) == "stored"  # the only one there is
    assert shown_job([], set(), ["gone"]) is None
