"""The OpenAI Images API's request, mapped onto a generation job; and its answer.

What maps to what:
- size: "1024x1024" and the SDXL bucket sizes of the aspect presets; "auto" or none: the server's default size.
  Anything else is a 400 listing the valid ones (SDXL draws poorly far from its training sizes).
- quality: "hd" / "high" (and "xhigh", "max") mean the high-quality preset (40 steps, refiner ensemble);
  "standard" / "low" / "medium" the draft preset (30 steps, base only); "auto" or none: imagesmith's default,
  which is high quality.
- n: 1 up to max_images_per_request (at most 4); image i has seed + i, the seed drawn per request.
- output_format (gpt-image-1): png, jpeg, webp. response_format: url or b64_json; unset, url, except for
  gpt-image models, which OpenAI answers with b64_json only (clients written for them read b64_json).
- model, style, user, moderation and output_compression are accepted and do not change the picture; any
  model name is taken (the server has one model). background "transparent" and stream=true are refused:
  SDXL cannot do the first, and the second needs a streaming answer this endpoint does not give.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagesmith.api.compat_request import generation_from
from imagesmith.api.errors import ApiError
from imagesmith.api.json_values import refuse_unsendable
from imagesmith.config import Settings
from imagesmith.schemas import ASPECT_SIZES, OutputFormat, RefusesBooleanNumbers
from imagesmith.sources.base import ImageRequest

SIZES: dict[str, tuple[int, int]] = {f"{w}x{h}": (w, h) for w, h in ASPECT_SIZES.values()}
HIGH_QUALITY = ("hd", "high", "xhigh", "max")
DRAFT_QUALITY = ("standard", "low", "medium")
OUTPUT_FORMATS = {"png": OutputFormat.PNG, "jpeg": OutputFormat.JPEG, "webp": OutputFormat.WEBP}
# GenerationRequest's field names, as the OpenAI request calls them (for the `param` of an error).
OPENAI_PARAMS = {"num_images": "n", "width": "size", "height": "size", "aspect": "size"}


class OpenAIImageRequest(RefusesBooleanNumbers):
    """POST /v1/images/generations. Unknown fields are ignored: newer clients send more than we read."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(..., description="What the image shows.")
    model: str | None = Field(None, description="Any name; this server has one model.")
    # Strict, as OpenAI's API is: lax mode took n=true as 1 and "2" as 2, stream="yes" as a request to stream.
    n: int | None = Field(
        None, strict=True, description="Images to make, 1 to the server's limit (at most 4)."
    )
    quality: str | None = Field(None, description="'hd'/'high': high-quality preset; 'standard': draft.")
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="Default: url; b64_json for gpt-image models, as OpenAI answers them."
    )
    size: str | None = Field(None, description="'1024x1024', another SDXL size, or 'auto'.")
    style: str | None = Field(None, description="Accepted and ignored.")
    user: str | None = Field(None, description="Accepted and ignored.")
    output_format: str | None = Field(None, description="png (default), jpeg or webp.")
    background: str | None = Field(None, description="'auto' or 'opaque'; 'transparent' is refused.")
    stream: bool | None = Field(None, strict=True, description="Must be false or absent.")

    @model_validator(mode="before")
    @classmethod
    def _no_nan_or_infinity_anywhere(cls, data: Any) -> Any:
        """JSON has no NaN or Infinity, though Python's reader takes them: refused in every field, those this
        route ignores too (output_compression: NaN got a 200 here and a 422 on every other route)."""
        return refuse_unsendable(data)

    def wants_base64(self) -> bool:
        if self.response_format is not None:
            return self.response_format == "b64_json"
        return (self.model or "").lower().startswith("gpt-image")


INVALID_STATUS, INVALID_CODE = 400, "invalid_value"  # how OpenAI answers a bad parameter


def invalid(message: str, param: str) -> ApiError:
    return ApiError(INVALID_STATUS, INVALID_CODE, message, param)


def _size(size: str | None) -> dict[str, int]:
    if size is None or size == "auto":
        return {}  # the server's default size (JobService.prepare)
    if size not in SIZES:
        valid = ", ".join(SIZES)
        raise invalid(f"size {size!r} is not supported; valid sizes: {valid}, or 'auto'", "size")
    width, height = SIZES[size]
    return {"width": width, "height": height}


def _high_quality(quality: str | None) -> bool:
    if quality is None or quality == "auto" or quality in HIGH_QUALITY:
        return True
    if quality in DRAFT_QUALITY:
        return False
    valid = ", ".join([*HIGH_QUALITY, *DRAFT_QUALITY, "auto"])
    raise invalid(f"quality {quality!r} is not supported; valid values: {valid}", "quality")


def to_image_request(body: OpenAIImageRequest, settings: Settings) -> ImageRequest:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= settings.max_images_per_request:
        raise invalid(
            f"n must be between 1 and {settings.max_images_per_request} on this server, got {n}", "n"
        )
    if body.stream:
        raise invalid("streaming is not supported; leave stream unset or false", "stream")
    if body.background == "transparent":
        raise invalid("transparent backgrounds are not supported; use 'auto' or 'opaque'", "background")
    if body.background not in (None, "auto", "opaque"):
        raise invalid(f"background {body.background!r} is not a value; use 'auto' or 'opaque'", "background")
    output_format = OUTPUT_FORMATS.get(body.output_format or "png")
    if output_format is None:
        raise invalid(
            f"output_format {body.output_format!r} is not supported; valid: {', '.join(OUTPUT_FORMATS)}",
            "output_format",
        )
    fields = {
        "prompt": body.prompt,
        "num_images": n,
        "high_quality": _high_quality(body.quality),
        "output_format": output_format,
        **_size(body.size),
    }
    return generation_from(fields, OPENAI_PARAMS, INVALID_STATUS, INVALID_CODE)


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = Field(
        None, description="The prompt as used (imagesmith does not rewrite it)."
    )


class OpenAIImagesResponse(BaseModel):
    created: int = Field(..., description="Unix time the images were made.")
    data: list[OpenAIImage]
