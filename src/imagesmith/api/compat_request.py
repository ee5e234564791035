"""What the compatibility routes (OpenAI images, A1111 txt2img) share: their mapped fields become one of our
GenerationRequests, and a field it refuses is reported under the name the client sent, in the route's own
error status and code; so is a field the service refuses later (its limits, the loaded model's split)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pydantic import ValidationError

from imagesmith.api.errors import ApiError
from imagesmith.jobs.service import ServiceError
from imagesmith.schemas import GenerationRequest, field_errors, in_callers_names
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
        raise ApiError(
            status, code, f"{name}: {in_callers_names(first.message, client_names)}", name
        ) from error
    return ImageRequest(sources=[SourceName.GENERATE], generation=generation)


@contextmanager
def service_errors_in_client_terms(client_names: Mapping[str, str]) -> Iterator[None]:
    """Around a submit: an error the service raises about a field (a server limit, the loaded model's split)
    is raised again naming the client's field, with the same type, so it keeps its status and code."""
    try:
        yield
    except ServiceError as error:
        if error.field is None:
            raise
        field = client_names.get(error.field, error.field)
        raise type(error)(in_callers_names(error.message, client_names), field, error.retry_after) from error
