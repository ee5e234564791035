"""OpenAI's `GET /v1/models` and `GET /v1/models/{id}`: the one model this server has, in OpenAI's shape.

OpenAI-compatible front-ends (chat UIs, SDK model pickers) list the models before they call anything; a 404 in
the service's own error format there left them with no model to pick. Generation accepts any model name (one
model per server, docs/compat.md), so the list names one, `imagesmith-sdxl`; retrieving another name is
OpenAI's 404, `model_not_found`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from imagesmith.api.deps import Authorized
from imagesmith.api.errors import ApiError

MODEL_ID = "imagesmith-sdxl"
_LISTED_SINCE = int(time.time())  # OpenAI's `created`: when this process began to serve the model

router = APIRouter(prefix="/v1/models", tags=["OpenAI Images API"], dependencies=[Authorized])


def _model() -> dict[str, Any]:
    return {"id": MODEL_ID, "object": "model", "created": _LISTED_SINCE, "owned_by": "imagesmith"}


@router.get("")
def list_models() -> dict[str, Any]:
    return {"object": "list", "data": [_model()]}


@router.get("/{model_id:path}")
def retrieve_model(model_id: str) -> dict[str, Any]:
    if model_id != MODEL_ID:
        raise ApiError(
            404,
            "model_not_found",
            f"the model {model_id!r} does not exist here; this server has one, {MODEL_ID!r} (generation accepts "
            "any model name)",
            "model",
        )
    return _model()
