"""Generation parameters embedded in the file, in the AUTOMATIC1111 format, read back intact."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagesmith.engine import Engine
from imagesmith.engine.output import parse_a1111_parameters, read_parameters
from imagesmith.schemas import GenerationRequest


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_embedded_parameters_round_trip(tiny_engine: Engine, fmt: str) -> None:
    request = GenerationRequest(
        prompt="a lighthouse, at dawn: golden",
        negative_prompt="blurry, text",
        width=64,
        height=64,
        num_inference_steps=10,
        scheduler="dpmpp_2m_karras",
        guidance_scale=6.5,
        seed=987654321987,
        output_format=fmt,
    )
    result = tiny_engine.generate(request)
    data = result.encoded(0)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
        assert image.size == (64, 64)
    text = read_parameters(data)
    assert text == result.parameters(0)
    parsed = parse_a1111_parameters(text)
    assert parsed["prompt"] == "a lighthouse, at dawn: golden"
    assert parsed["negative_prompt"] == "blurry, text"
    assert parsed["Steps"] == "10"
    assert parsed["Sampler"] == "DPM++ 2M Karras"
    assert parsed["CFG scale"] == "6.5"
    assert parsed["Seed"] == "987654321987"
    assert parsed["Size"] == "64x64"
    assert parsed["Model"] == "tiny-sdxl-base"
    assert parsed["Refiner"] == "tiny-sdxl-refiner"
    assert parsed["Refiner switch at"] == "0.8"


def test_a_quoted_value_with_commas_survives() -> None:
    text = 'a cat\nSteps: 20, Sampler: Euler, Not refined: "refiner failed: OOM, at step 3", Seed: 1'
    parsed = parse_a1111_parameters(text)
    assert parsed["Not refined"] == "refiner failed: OOM, at step 3" and parsed["Seed"] == "1"
    assert parsed["prompt"] == "a cat" and parsed["negative_prompt"] == ""
