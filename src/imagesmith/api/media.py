"""The seed's media API, kept compatible: POST /api/media/generate-image is a job plus a wait."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imagesmith.api.deps import Authorized, ServiceDep, SettingsDep
from imagesmith.api.errors import ApiError
from imagesmith.api.health import health_options, report_for
from imagesmith.api.json_values import refuse_unsendable
from imagesmith.api.text_check import TextCheckedRoute
from imagesmith.api.waiting import submit_and_wait, succeeded_result
from imagesmith.jobs.service import SourcesUnavailable, StockNotConfigured
from imagesmith.jobs.store import JobStatus
from imagesmith.schemas import (
    MAX_NUM_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    AspectPreset,
    GenerationRequest,
    OutputFormat,
    RefineMode,
    RefusesBooleanNumbers,
    SchedulerName,
    seed_not_negative,
)
from imagesmith.sources.base import ImageRequest, SourceName

router = APIRouter(prefix="/api/media", tags=["media (seed API)"], route_class=TextCheckedRoute)


class ImageGenerationRequest(RefusesBooleanNumbers):
    """The seed's request, field for field (same names, defaults and bounds), plus the engine's optional fields.

    Unknown fields are ignored, as the seed's model did, so existing clients keep working.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    # --- the seed's fields ---
    prompt: str = Field(..., description="What the image shows.")
    title: str | None = Field(None, max_length=200, description="Article title (helps stock search).")
    keywords: list[str] | None = Field(
        None, max_length=20, description="Search keywords for stock photos (up to 20; the search uses six)."
    )
    use_pexels: bool = Field(
        True, description="Try a Pexels stock photo first (needs a Pexels key on the server)."
    )
    use_generation: bool = Field(False, description="Generate with SDXL (when no stock photo serves).")
    use_refinement: bool = Field(True, description="Run the SDXL refiner.")
    high_quality: bool = Field(True, description="Quality defaults (refiner on unless disabled).")
    num_inference_steps: int = Field(50, ge=20, le=100, description="Total denoising steps (base + refiner).")
    guidance_scale: float = Field(8.0, ge=1.0, le=20.0, description="Classifier-free guidance.")
    # --- the engine's new optional fields ---
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    width: int | None = Field(None, description="Multiple of 8, 64-2048; default: the server's default size.")
    height: int | None = Field(None, description="Multiple of 8, 64-2048.")
    aspect: AspectPreset | None = Field(None, description="Named size preset instead of width/height.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    refine_mode: RefineMode | None = None
    high_noise_frac: float = Field(0.8, gt=0.0, lt=1.0)
    scheduler: SchedulerName = SchedulerName.EULER
    num_images: int = Field(
        1, ge=1, le=MAX_NUM_IMAGES, description="Images to make; at most the server's max_images_per_request."
    )
    output_format: OutputFormat = OutputFormat.PNG

    @model_validator(mode="before")
    @classmethod
    def _no_nan_or_infinity_anywhere(cls, data: Any) -> Any:
        """Unknown fields are ignored, not unchecked: NaN in one got a 200 where every other route refuses it."""
        return refuse_unsendable(data)

    @field_validator("seed", mode="before")
    @classmethod
    def _negative_seed_says_how_to_get_a_random_one(cls, value: object) -> object:
        return seed_not_negative(value)

    def to_image_request(self) -> ImageRequest:
        sources = []
        if self.use_pexels:
            sources.append(SourceName.STOCK)
        if self.use_generation:
            sources.append(SourceName.GENERATE)
        if not sources:
            raise ApiError(
                422,
                "no_source",
                "use_pexels and use_generation are both false; enable at least one",
                "use_generation",
            )
        not_generation = {"title", "keywords", "use_pexels", "use_generation"}
        if not self.high_quality and "num_inference_steps" not in self.model_fields_set:
            # The seed's 50 is its high-quality default ("50 base steps + 30 refinement steps (vs 30 base
            # steps)"): a draft left to its default gets the draft's 30, as on every other route.
            not_generation.add("num_inference_steps")
        generation = GenerationRequest.model_validate(
            self.model_dump(exclude=not_generation, exclude_none=True)
        )
        return ImageRequest(
            sources=sources, generation=generation, title=self.title, keywords=self.keywords or []
        )


class ImageInfo(BaseModel):
    url: str
    sha256: str
    media_type: str
    width: int
    height: int
    bytes: int


class ImageGenerationResponse(BaseModel):
    success: bool
    image_url: str = Field(..., description="Absolute URL of the (first) image.")
    image_urls: list[str]
    images: list[ImageInfo]
    source: str = Field(..., description="Which source served it: 'stock' (Pexels) or 'generate'.")
    source_reason: str = Field(
        ...,
        description="Why that source: 'requested' when the first choice served, else why each source before it "
        "passed, e.g. 'stock: quota_exhausted (...; calls resume at ...)'.",
    )
    attempts: list[dict[str, Any]] = Field(
        ..., description="Every source tried, in order: source, served, reason, detail, retry_at."
    )
    attribution: dict[str, Any] | None = Field(
        None,
        description="For a stock photo, the credit to show (photographer, photographer_url, photo_url, alt, "
        "avg_color, credit_text, credit_html); it is embedded in the file too. None for generated images.",
    )
    job_id: str
    metadata: dict[str, Any] = Field(
        ..., description="What the source reports (engine: seeds, stages, ...; stock: query, photo_id, ...)."
    )


# How a job that no source could serve answers on the seed endpoint (its error code -> HTTP status).
SOURCE_FAILURE_STATUS = {"no_results": 404, "quota_exhausted": 503, "source_unavailable": 503}


def absolute(request: Request, path: str) -> str:
    return str(request.base_url).rstrip("/") + path


@router.post("/generate-image", response_model=ImageGenerationResponse, dependencies=[Authorized])
async def generate_image(
    body: ImageGenerationRequest, request: Request, service: ServiceDep, settings: SettingsDep
) -> ImageGenerationResponse:
    try:
        job = await submit_and_wait(
            service, body.to_image_request(), settings.wait_timeout_s, request.headers.get("idempotency-key")
        )
    except StockNotConfigured as refused:  # said in this endpoint's flags, not /v1/jobs' sources
        fix = "set use_generation=true to generate the image instead"
        raise StockNotConfigured.with_fix(fix, "use_generation") from refused
    except SourcesUnavailable as refused:  # the same: this endpoint has no `sources` to blame
        if body.use_generation:
            raise
        raise SourcesUnavailable(
            f"{refused.message}; use_generation=true would generate the image instead", "use_generation"
        ) from refused
    error = job.error or {}
    code = error.get("code")
    if job.status is JobStatus.FAILED and code in SOURCE_FAILURE_STATUS:
        # No source could serve: say which tried and why, not a 500.
        raise ApiError(
            SOURCE_FAILURE_STATUS[code],
            code,
            error.get("message", "no source could serve the image"),
            "use_generation" if not body.use_generation else None,
            headers=retry_after(error.get("retry_at")),
            extra={key: error.get(key) for key in ("reason", "retry_at", "attempts")} | {"job_id": job.id},
        )
    result = succeeded_result(job, settings.wait_timeout_s)  # or the timeout / canceled / failed error
    images = [ImageInfo(**{**image, "url": absolute(request, image["url"])}) for image in result["images"]]
    return ImageGenerationResponse(
        success=True,
        image_url=images[0].url,
        image_urls=[image.url for image in images],
        images=images,
        source=result["source"],
        source_reason=result.get("source_reason", "requested"),
        attempts=result.get("attempts", []),
        attribution=result.get("attribution"),
        job_id=job.id,
        metadata=result["metadata"],
    )


def retry_after(retry_at: str | None) -> dict[str, str] | None:
    """A Retry-After header (whole seconds, at least 1) for an ISO time, e.g. a Pexels quota reset."""
    if not retry_at:
        return None
    seconds = (datetime.fromisoformat(retry_at) - datetime.now(UTC)).total_seconds()
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


@router.get("/health")
@router.head("/health", include_in_schema=False)  # the same, headers only (the server drops HEAD's body)
def media_health(request: Request) -> dict[str, Any]:
    """The seed's health check: pexels_ok / sdxl_ok, plus the full report (the status fields only for a
    caller without a key when keys are set). Always 200; read `status`."""
    return report_for(request)


@router.options("/health", include_in_schema=False)
def media_health_options() -> Response:
    """As OPTIONS /v1/health: 200 and Allow: GET, HEAD, OPTIONS."""
    return health_options()
