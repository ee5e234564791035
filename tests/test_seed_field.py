"""A request's seed: a negative one says how to get a random one, however it was sent."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from imagesmith.api.media import ImageGenerationRequest
from imagesmith.schemas import GenerationRequest


@pytest.mark.parametrize("request_model", [GenerationRequest, ImageGenerationRequest])
@pytest.mark.parametrize("seed", [-1, "-1", " -3 ", -1.0])
def test_a_negative_seed_says_to_leave_it_out(seed: object, request_model: type) -> None:
    """A1111 clients send -1 (or "-1") for random; the answer was pydantic's "greater than or equal to 0", and
    on the seed endpoint (its own model) it still was."""
    with pytest.raises(
        ValidationError, match=r"must be 0 or more, got .*; leave the seed out for a random one"
    ):
        request_model(prompt="p", seed=seed)


def test_other_seeds_are_read_as_before() -> None:
    assert GenerationRequest(prompt="p", seed="7").seed == 7
    assert GenerationRequest(prompt="p").seed is None
    with pytest.raises(ValidationError, match="valid integer"):
        GenerationRequest(prompt="p", seed="random")
