"""The OpenAI Images API, `POST /v1/images/generations`: a job plus a wait, answered in OpenAI's shape.

The official `openai` client, pointed at this server (base_url=".../v1"), works unmodified. Errors are OpenAI's
error object (errors.py writes it for this route family). The mapping is in openai_mapping.py.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from imagesmith.api.compat_request import service_errors_in_client_terms
from imagesmith.api.deps import Authorized, FilesDep, ServiceDep, SettingsDep
from imagesmith.api.errors import ApiError
from imagesmith.api.media import absolute
from imagesmith.api.openai_mapping import (
    OPENAI_PARAMS,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    to_image_request,
)
from imagesmith.api.text_check import TextCheckedRoute
from imagesmith.api.waiting import stored_image_base64, submit_and_wait, succeeded_result

router = APIRouter(
    prefix="/v1/images", tags=["OpenAI Images API"], dependencies=[Authorized], route_class=TextCheckedRoute
)

# The openai client retries 409s and 5xx by itself; a job that failed, was canceled or is still running must not
# be submitted again behind the caller's back.
NO_RETRY = {"x-should-retry": "false"}


@router.post("/generations", response_model=OpenAIImagesResponse, response_model_exclude_none=True)
async def create_image(
    body: OpenAIImageRequest, request: Request, service: ServiceDep, settings: SettingsDep, files: FilesDep
) -> dict[str, Any]:
    with service_errors_in_client_terms(OPENAI_PARAMS):
        job = await submit_and_wait(
            service,
            to_image_request(body, settings),
            settings.openai_wait_timeout_s,  # answered before the client's own timeout: config.py says why
            request.headers.get("idempotency-key"),
        )
    result = succeeded_result(job, settings.openai_wait_timeout_s, NO_RETRY)
    data = []
    for image in result["images"]:
        item: dict[str, Any] = {"revised_prompt": body.prompt}
        if body.wants_base64():
            item["b64_json"] = stored_image_base64(files, image)
        else:
            item["url"] = absolute(request, image["url"])
        data.append(item)
    return {"created": int(job.finished_at or time.time()), "data": data}


@router.post("/edits", include_in_schema=False)
@router.post("/variations", include_in_schema=False)
async def not_supported(request: Request) -> None:
    """OpenAI's image edits and variations take an image in; imagesmith makes images from text only. Said
    plainly, rather than the 405 the image route's GET /v1/images/{name} made of them."""
    raise ApiError(
        404,
        "not_supported",
        f"{request.url.path} is not supported: imagesmith makes images from text (POST /v1/images/generations)",
    )
