"""A request's field errors, said as the CLI option the user typed (src/imagesmith/option_errors.py)."""

import pytest
from pydantic import ValidationError

from imagesmith.option_errors import USAGE_ERROR, report_option_errors
from imagesmith.schemas import GenerationRequest


def test_each_field_error_names_its_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError) as raised:
        GenerationRequest(prompt="x", num_inference_steps=0, width=1001).resolve()
    status = report_option_errors("generate", raised.value, {"num_inference_steps": "--steps"})
    lines = capsys.readouterr().err.splitlines()
    assert status == USAGE_ERROR == 2
    # A mapped field is named by its option; one without a mapping by its own name as an option.
    assert any(line.startswith("imagesmith generate: error: --steps: ") for line in lines), lines
    # The option once: "--width: width must" (generate) and "--width: --width must" (bench) named it twice.
    assert any(
        line.startswith("imagesmith generate: error: --width: must be a multiple of 8") for line in lines
    )
    report_option_errors("bench", raised.value, {"width": "--width"})
    assert "imagesmith bench: error: --width: must be a multiple of 8, got 1001" in capsys.readouterr().err
    assert not any("num_inference_steps" in line.split(": ")[2] for line in lines)
