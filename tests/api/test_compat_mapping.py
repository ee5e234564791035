"""The compatibility mappings on their own: OpenAI sizes and qualities, A1111 samplers, refiner and seeds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from imagesmith.api.a1111_mapping import Txt2ImgRequest, resolve_sampler
from imagesmith.api.a1111_mapping import to_image_request as a1111_request
from imagesmith.api.errors import ApiError
from imagesmith.api.media import ImageGenerationRequest
from imagesmith.api.openai_mapping import SIZES, OpenAIImageRequest
from imagesmith.api.openai_mapping import to_image_request as openai_request
from imagesmith.config import Settings
from imagesmith.schemas import OutputFormat, RefineMode, SchedulerName

SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]


def test_openai_sizes_and_quality() -> None:
    assert "1024x1024" in SIZES and "1216x832" in SIZES and "768x1344" in SIZES
    wide = openai_request(OpenAIImageRequest(prompt="p", size="1344x768", quality="hd"), SETTINGS).generation
    resolved = wide.resolve()
    assert (resolved.width, resolved.height) == (1344, 768)
    assert resolved.refine_mode is RefineMode.ENSEMBLE and resolved.num_inference_steps == 40
    draft = openai_request(OpenAIImageRequest(prompt="p", quality="standard", n=3), SETTINGS).generation
    assert draft.width is None and draft.num_images == 3  # no size: the server's default
    assert draft.resolve().refine_mode is RefineMode.NONE and draft.resolve().num_inference_steps == 30
    jpeg = openai_request(OpenAIImageRequest(prompt="p", output_format="jpeg"), SETTINGS).generation
    assert jpeg.output_format is OutputFormat.JPEG


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "1792x1024"}, "size"),
        ({"n": 0}, "n"),
        ({"quality": "ultra"}, "quality"),
        ({"stream": True}, "stream"),
        ({"background": "transparent"}, "background"),
    ],
)
def test_openai_refusals_name_the_param(fields: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        openai_request(OpenAIImageRequest.model_validate({"prompt": "p", **fields}), SETTINGS)
    assert caught.value.status == 400 and caught.value.field == param


@pytest.mark.parametrize(
    ("sampler", "scheduler", "ours"),
    [
        (None, None, SchedulerName.EULER),
        ("Euler a", "automatic", SchedulerName.EULER_ANCESTRAL),
        ("k_euler_a", None, SchedulerName.EULER_ANCESTRAL),
        ("DPM++ 2M", "Karras", SchedulerName.DPMPP_2M_KARRAS),
        ("DPM++ 2M Karras", "Automatic", SchedulerName.DPMPP_2M_KARRAS),
        ("dpm++ 2m", None, SchedulerName.DPMPP_2M),
        ("DDIM", "", SchedulerName.DDIM),
        ("UniPC", None, SchedulerName.UNIPC),
    ],
)
def test_a1111_samplers(sampler: str | None, scheduler: str | None, ours: SchedulerName) -> None:
    assert resolve_sampler(sampler, scheduler) is ours


def test_a1111_sampler_index_is_the_fallback_and_unknowns_are_refused() -> None:
    request = a1111_request(Txt2ImgRequest(prompt="p", sampler_index="DDIM"), SETTINGS)
    assert request.generation.scheduler is SchedulerName.DDIM
    both = Txt2ImgRequest(prompt="p", sampler_name="UniPC", sampler_index="Euler a")
    assert a1111_request(both, SETTINGS).generation.scheduler is SchedulerName.UNIPC
    for sampler, scheduler, field in (("LMS", None, "sampler_name"), ("Euler", "Exponential", "scheduler")):
        with pytest.raises(ApiError) as caught:
            resolve_sampler(sampler, scheduler)
        assert caught.value.status == 422 and caught.value.field == field


def test_a1111_refiner_seed_and_batches() -> None:
    default = a1111_request(Txt2ImgRequest(prompt="p", n_iter=2, batch_size=2), SETTINGS).generation
    assert default.seed is None and default.num_images == 4 and default.refine_mode is None
    assert default.resolve().refine_mode is RefineMode.ENSEMBLE
    chosen = Txt2ImgRequest(prompt="p", seed=7, refiner_checkpoint="refiner", refiner_switch_at=0.6)
    generation = a1111_request(chosen, SETTINGS).generation
    assert generation.seed == 7 and generation.refine_mode is RefineMode.ENSEMBLE
    assert generation.high_noise_frac == 0.6
    for off in ({"refiner_checkpoint": ""}, {"refiner_checkpoint": "None"}, {"refiner_checkpoint": None},
                {"refiner_checkpoint": "r", "refiner_switch_at": 1.0},
                {"refiner_switch_at": 1.0}, {"refiner_switch_at": 1.5}):  # fmt: skip
        assert (
            a1111_request(Txt2ImgRequest(prompt="p", **off), SETTINGS).generation.refine_mode
            is RefineMode.NONE
        )
    with pytest.raises(ValidationError, match="greater than or equal to -1"):  # -1 is A1111's "random"
        Txt2ImgRequest(prompt="p", seed=-5)
    with pytest.raises(ApiError) as caught:
        a1111_request(Txt2ImgRequest(prompt="p", refiner_checkpoint="r", refiner_switch_at=0.0), SETTINGS)
    assert caught.value.field == "refiner_switch_at"


def test_openai_answer_format_follows_the_model_when_not_asked() -> None:
    assert not OpenAIImageRequest(prompt="p").wants_base64()
    assert not OpenAIImageRequest(prompt="p", model="dall-e-3").wants_base64()
    assert OpenAIImageRequest(prompt="p", model="gpt-image-1").wants_base64()
    assert not OpenAIImageRequest(prompt="p", model="gpt-image-1", response_format="url").wants_base64()
    assert OpenAIImageRequest(prompt="p", response_format="b64_json").wants_base64()


@pytest.mark.parametrize(
    ("model", "fields", "field"),
    [
        (OpenAIImageRequest, {"prompt": "p", "n": True}, "n"),
        (Txt2ImgRequest, {"prompt": "p", "seed": True}, "seed"),
        (Txt2ImgRequest, {"prompt": "p", "batch_size": False}, "batch_size"),
        (ImageGenerationRequest, {"prompt": "p", "seed": True}, "seed"),
        (ImageGenerationRequest, {"prompt": "p", "width": True}, "width"),
    ],
)
def test_every_request_model_refuses_a_boolean_number(
    model: type, fields: dict[str, object], field: str
) -> None:
    """Pydantic's lax mode read true as 1 (seed 1, one image); each model's bool fields still take booleans."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(fields)
    errors = caught.value.errors()
    assert [e["loc"][-1] for e in errors] == [field]
    assert "got true (a boolean)" in errors[0]["msg"] or "got false (a boolean)" in errors[0]["msg"]


def test_a1111_fields_that_would_change_the_picture_are_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """compat.md promises a warning for each; a variation seed's strength and override_settings had none."""
    body = Txt2ImgRequest(
        prompt="x",
        tiling=True,
        subseed=5,
        subseed_strength=0.5,
        override_settings={"sd_model_checkpoint": "foo", "CLIP_stop_at_last_layers": 2},
    )
    with caplog.at_level("WARNING"):
        a1111_request(body, Settings())
    assert (
        "txt2img: ignoring tiling, subseed_strength 0.5, override_settings (CLIP_stop_at_last_layers, "
        "sd_model_checkpoint) (not supported by imagesmith)" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        a1111_request(Txt2ImgRequest(prompt="x", subseed=5, override_settings={}), Settings())
    assert "ignoring" not in caplog.text  # a subseed without strength changes nothing
