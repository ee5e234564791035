"""Bad input gets an error that names the field and says how to fix it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from imagesmith.schemas import GenerationRequest, RefineMode, field_errors


def errors_for(**fields: object) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(**fields)  # type: ignore[arg-type]
    return {item.field: item.message for item in field_errors(caught.value)}


def test_width_not_multiple_of_8_names_field_and_neighbours() -> None:
    assert errors_for(prompt="x", width=1001) == {
        "width": "width must be a multiple of 8, got 1001; the nearest valid values are 1000 and 1008"
    }


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"height": 4096}, "height"),
        ({"height": 32}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 500}, "num_inference_steps"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 33}, "num_images"),  # past MAX_NUM_IMAGES (a server's lower limit is its own check)
        ({"high_noise_frac": 1.0}, "high_noise_frac"),
        ({"refine_strength": 0}, "refine_strength"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"scheduler": "heun"}, "scheduler"),
        ({"refine_mode": "sideways"}, "refine_mode"),
        ({"output_format": "gif"}, "output_format"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_out_of_range_values_name_their_field(fields: dict[str, object], field: str) -> None:
    assert field in errors_for(prompt="x", **fields)


def test_a_number_that_is_not_finite_is_refused_as_such() -> None:
    """NaN passed every bound check but one, which then said "less than or equal to 30"."""
    for value in (float("nan"), float("inf")):
        assert errors_for(prompt="x", guidance_scale=value) == {
            "guidance_scale": "Input should be a finite number"
        }
        assert (
            "Input should be a finite number"
            in errors_for(prompt="x", high_noise_frac=value)["high_noise_frac"]
        )


@pytest.mark.parametrize("field", ["seed", "width", "num_inference_steps", "num_images", "guidance_scale"])
def test_a_boolean_where_a_number_goes_is_refused_as_a_boolean(field: str) -> None:
    """Pydantic's lax mode reads true as 1: {"seed": true} ran seed 1, and {"width": true} said "got 1"."""
    assert errors_for(prompt="x", **{field: True}) == {field: "must be a number, got true (a boolean)"}


def test_blank_prompt_is_refused() -> None:
    assert "prompt" in errors_for(prompt="   ")
    # Invisible characters too: a zero-width space or a byte-order mark alone generated an unprompted image.
    for invisible in ("\u200b", "\ufeff", " \u200b\u00a0", "\u0000", "\u0000\u0001\n"):
        assert errors_for(prompt=invisible).get("prompt", "").startswith("prompt must contain text"), (
            invisible
        )
    assert GenerationRequest(prompt="a\u200bb").prompt == "a\u200bb"  # text with one inside is text


def test_cross_field_errors_name_the_field_to_change() -> None:
    assert "high_noise_frac" in errors_for(prompt="x", num_inference_steps=2, high_noise_frac=0.3)
    assert "refine_strength" in errors_for(
        prompt="x", refine_mode="img2img", refine_steps=2, refine_strength=0.2
    )
    assert "aspect" in errors_for(prompt="x", aspect="wide", width=1024)


def test_an_empty_stage_blames_what_the_client_chose_and_names_the_fewest_steps_that_work() -> None:
    """The split at its default: the steps are to blame, and the fix is a number, not "move high_noise_frac
    toward 0.8" (it was 0.8). A split the client set: blamed, with both fixes."""
    [(field, message)] = errors_for(prompt="x", num_inference_steps=1).items()
    assert field == "num_inference_steps"
    assert message.endswith("at high_noise_frac 0.8 (the default) leave the base or the refiner no step; "
                            "raise num_inference_steps to 2 or more")  # fmt: skip
    [(field, message)] = errors_for(prompt="x", num_inference_steps=3, high_noise_frac=0.1).items()
    assert field == "high_noise_frac"
    assert message.endswith("raise num_inference_steps to 10 or more, or move high_noise_frac closer to 0.5")
    GenerationRequest(prompt="x", num_inference_steps=10, high_noise_frac=0.1)  # the fix it names works
    [(field, message)] = errors_for(prompt="x", num_inference_steps=150, high_noise_frac=0.001).items()
    assert field == "high_noise_frac"  # no step count is enough
    assert message.endswith("no step; move high_noise_frac closer to 0.5")


def test_defaults_follow_the_seed_flags() -> None:
    default = GenerationRequest(prompt="x").resolve()
    assert (default.width, default.height, default.num_inference_steps, default.refine_mode) == (
        1024,
        1024,
        40,
        RefineMode.ENSEMBLE,
    )
    draft = GenerationRequest(prompt="x", high_quality=False).resolve()
    assert (draft.num_inference_steps, draft.refine_mode) == (30, RefineMode.NONE)
    unrefined = GenerationRequest(prompt="x", use_refinement=False, refine_mode="img2img").resolve()
    assert unrefined.refine_mode is RefineMode.NONE
    wide = GenerationRequest(prompt="x", aspect="landscape").resolve()
    assert (wide.width, wide.height) == (1216, 832)


def test_output_format_from_a_file_suffix() -> None:
    from imagesmith.schemas import OutputFormat

    cases = {".PNG": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", "": "png"}
    for suffix, expected in cases.items():
        assert OutputFormat.for_suffix(suffix, OutputFormat.PNG) == expected, suffix
    with pytest.raises(ValueError, match=r"\.gif is not a format imagesmith writes"):
        OutputFormat.for_suffix(".gif", OutputFormat.PNG)
    assert OutputFormat.JPEG.media_type == "image/jpeg"
