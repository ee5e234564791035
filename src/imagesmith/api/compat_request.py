"""What the compatibility routes (OpenAI images, A1111 txt2img) share: their mapped fields become one of our
GenerationRequests, and a field it refuses is reported under the name the client sent, in the route's own
error status and code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from imagesmith.api.errors import ApiError
from imagesmith.schemas import GenerationRequest, field_errors
from imagesmith.sources.base import ImageRequest, SourceName


def generation_from(
    fields: Mapping[str, Any], client_names: Mapping[str, str], status: int, code: str
) -> ImageRequest:
    """Validate `fields` (our names) as a generation; `client_names` maps our field names to the client's."""
    try:
        generation = GenerationRequest.model_validate(dict(fields))
    except ValidationError as error:
        first = field_errors(error)[0]
        name = client_names.get(first.field, first.field)
        raise ApiError(status, code, f"{name}: {first.message}", name) from error
    return ImageRequest(sources=[SourceName.GENERATE], generation=generation)
