"""The AUTOMATIC1111 web UI API (/sdapi/v1): txt2img as a job plus a wait, live progress, interrupt, and the
lists clients look at first (models, samplers, schedulers, options). The lists are read-only; POST /options is
accepted as clients send it, but changes nothing: the one model served is chosen at start (it refuses another).

A1111 has one global "current generation"; here, progress and interrupt act on the jobs this API submitted
(progress falls back to whatever job is running, for monitors). Errors are written in A1111's shape by errors.py.
The mapping is in a1111_mapping.py.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from PIL import Image
from pydantic import BaseModel, Field

from imagesmith.api.a1111_mapping import (
    A1111_FIELDS,
    Txt2ImgRequest,
    info,
    sampler_list,
    scheduler_list,
    to_image_request,
)
from imagesmith.api.compat_request import service_errors_in_client_terms
from imagesmith.api.deps import Authorized, FilesDep, ServiceDep, SettingsDep
from imagesmith.api.errors import ApiError
from imagesmith.api.json_values import refuse_unsendable
from imagesmith.api.store_writes import in_write_thread
from imagesmith.api.text_check import TextCheckedRoute
from imagesmith.api.waiting import stored_image_base64, submit_and_wait, succeeded_result
from imagesmith.config import ENV_PREFIX, ModelPreset, Settings
from imagesmith.engine.output import model_label
from imagesmith.engine.progress import DECODE_STAGE
from imagesmith.jobs.progress_tracker import LiveProgress
from imagesmith.jobs.service import JobService
from imagesmith.jobs.store import JobStatus
from imagesmith.schemas import GenerationMetadata, blame

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"], dependencies=[Authorized], route_class=TextCheckedRoute
)


class A1111Jobs:
    """Ids of the jobs submitted through this API and not yet seen finished: what progress and interrupt mean
    by "the current generation". In memory: the txt2img request that made each one waits for it anyway."""

    def __init__(self) -> None:
        self.ids: dict[str, None] = {}  # insertion-ordered set

    def add(self, job_id: str) -> None:
        self.ids[job_id] = None

    def prune(self, service: JobService) -> None:
        for job_id in list(self.ids):
            job = service.store.get(job_id)
            if job is None or job.status.terminal:
                self.ids.pop(job_id, None)


def a1111_jobs(request: Request) -> A1111Jobs:
    jobs: A1111Jobs = request.app.state.a1111_jobs
    return jobs


JobsDep = Annotated[A1111Jobs, Depends(a1111_jobs)]


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(..., description="Base64 PNGs (no data: prefix), one per image.")
    parameters: dict[str, Any] = Field(..., description="The request's fields, echoed.")
    info: str = Field(..., description="JSON string: seed, all_seeds, infotexts, ... as A1111 writes it.")


class ProgressResponse(BaseModel):
    progress: float = Field(..., description="0-1 across the whole job.")
    eta_relative: float = Field(..., description="Seconds left, estimated.")
    state: dict[str, Any]
    current_image: str | None = Field(None, description="Base64 PNG preview of the running job.")
    textinfo: str | None = None


@router.post("/txt2img", response_model=Txt2ImgResponse)
async def txt2img(
    body: Txt2ImgRequest,
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    files: FilesDep,
    jobs: JobsDep,
) -> dict[str, Any]:
    try:
        with service_errors_in_client_terms(A1111_FIELDS):
            job = await submit_and_wait(
                service,
                to_image_request(body, settings),
                settings.wait_timeout_s,
                request.headers.get("idempotency-key"),
                on_submitted=jobs.add,
            )
    finally:
        jobs.prune(service)
    parameters = body.model_dump()
    if job.status is JobStatus.CANCELED:
        # A1111 answers an interrupted txt2img normally, with what it has; we have no images yet.
        record = {"prompt": body.prompt, "all_seeds": [], "interrupted": True, "job_id": job.id}
        return {"images": [], "parameters": parameters, "info": json.dumps(record)}
    result = succeeded_result(job, settings.wait_timeout_s)
    images = [stored_image_base64(files, image) for image in result["images"]] if body.send_images else []
    meta = GenerationMetadata.model_validate(result["metadata"])
    return {"images": images, "parameters": parameters, "info": info(body, meta, job.started_at)}


def _png_base64(data_url: str) -> str:
    """A preview data: URL (JPEG) as A1111's current_image: base64 PNG without a prefix."""
    raw = base64.b64decode(data_url.split(",", 1)[1])
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(raw)) as image:
        image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _idle_state(job_count: int = 0) -> dict[str, Any]:
    return {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": job_count,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }


def shown_job(live: list[str], on_gpu: set[str], ours: list[str]) -> str | None:
    """The job /progress reports: one this API started if any is live, else any live job; among those, one whose
    pass runs now before one whose pass is done and whose images are being stored (it stays live meanwhile)."""
    candidates = [job_id for job_id in ours if job_id in live] or live
    return next((job_id for job_id in candidates if job_id in on_gpu), candidates[0] if candidates else None)


def sampling_counts(now: LiveProgress) -> tuple[int, int]:
    """A1111's sampling_step and sampling_steps: the stage's count while it denoises. A1111 keeps its sampler's
    last count, every step done, while it decodes the pixels, so the decode (a stage of one pass here, 0 of 1
    then 1 of 1) shows the job's denoising steps, all done."""
    if now.stage == DECODE_STAGE:
        return now.overall_step, now.overall_total
    return now.step, now.total


@router.get("/progress", response_model=ProgressResponse)
def progress(service: ServiceDep, jobs: JobsDep, skip_current_image: bool = False) -> dict[str, Any]:
    """The running job's progress: one of this API's if any runs, else whatever job runs; idle otherwise."""
    live = dict(service.worker.live)
    job_id = shown_job(list(live), service.worker.on_gpu(), list(jobs.ids))
    job = service.store.get(job_id) if job_id else None
    if job_id is None or job is None or job.status is not JobStatus.RUNNING:
        waiting = [j for j in map(service.store.get, list(jobs.ids)) if j and j.status is JobStatus.QUEUED]
        text = f"Waiting: {len(waiting)} job(s) queued" if waiting else None
        return {"progress": 0.0, "eta_relative": 0.0, "state": _idle_state(len(waiting)), "textinfo": text}
    now = live[job_id]
    preview = None if skip_current_image else service.live_preview(job_id)
    started = job.started_at or time.time()
    sampling_step, sampling_steps = sampling_counts(now)
    state = {
        **_idle_state(1),
        "interrupted": job.cancel_requested,
        "job": f"task({job_id})",
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "sampling_step": sampling_step,
        "sampling_steps": sampling_steps,
    }
    return {
        "progress": now.fraction,
        "eta_relative": now.eta_rounded_s or 0.0,
        "state": state,
        "current_image": _png_base64(preview) if preview else None,
        "textinfo": f"{now.stage}: step {now.step}/{now.total}",
    }


@router.post("/interrupt")
async def interrupt(service: ServiceDep, jobs: JobsDep) -> dict[str, Any]:
    """Stop the running generation(s) this API started, within a step; their txt2img answers with no images."""

    def cancel_ours() -> None:
        live = dict(service.worker.live)
        for job_id in list(jobs.ids):
            if job_id in live:
                service.cancel(job_id)

    await in_write_thread(cancel_ours, service.store)  # a cancel writes the store (store_writes.py)
    return {}


def _models(request: Request) -> list[tuple[str, str]]:
    """(label, source) of the base model and, when configured, the refiner."""
    engine = request.app.state.generate.engine
    if engine is not None:
        described = engine.describe()
        sources = [described.get("base_model"), described.get("refiner_model")]
    else:  # still loading: what the settings name
        settings: Settings = request.app.state.settings
        tiny = settings.model is ModelPreset.TINY
        sources = (
            ["tiny-sdxl-base", "tiny-sdxl-refiner"] if tiny else [settings.base_model, settings.refiner_model]
        )
    return [(model_label(str(source)) or str(source), str(source)) for source in sources if source]


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    """The base model and the refiner (use its title as refiner_checkpoint). No file hashes are computed."""
    return [
        {
            "title": label,
            "model_name": label,
            "hash": None,
            "sha256": None,
            "filename": source,
            "config": None,
        }
        for label, source in _models(request)
    ]


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return sampler_list()


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return scheduler_list()


def _current_options(request: Request, settings: Settings) -> dict[str, Any]:
    models = _models(request)
    return {
        "sd_model_checkpoint": models[0][0] if models else None,
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "live_previews_enable": settings.preview_every > 0,
        "show_progress_every_n_steps": settings.preview_every or -1,
    }


@router.get("/options")
async def options(request: Request, settings: SettingsDep) -> dict[str, Any]:
    """The few A1111 options that mean something here. POST /options changes none of them."""
    return _current_options(request, settings)


# A1111's checkpoint titles end in the file's short hash: "sd_xl_base_1.0.safetensors [31e35c80fc]".
_TITLE_HASH = re.compile(r"^(?P<title>.*\S)\s+\[[^\[\]]*\]$")


def _names(value: Any, label: str, source: str) -> bool:
    """Whether an sd_model_checkpoint names this model: its title (also with A1111's " [hash]") or filename."""
    if not isinstance(value, str):
        return False
    asked, names = value.strip(), {label, source} - {""}
    bare = _TITLE_HASH.match(asked)
    return asked in names or (bare is not None and bare["title"] in names)


def _refuse_unsendable_options(body: dict[str, Any]) -> None:
    """NaN, Infinity or a value nested too deep is refused here as on every other route, ignored option or not."""
    try:
        refuse_unsendable(body)
    except ValueError as error:
        field, message = blame("body", str(error))  # the "[field] message" tag, read as every route reads it
        raise ApiError(422, "invalid_request", message, field) from None


def _check_checkpoint(request: Request, value: Any) -> None:
    """sd_model_checkpoint may name the base model served, as /sd-models lists it; any other (the refiner
    included) is a 422 with the fix: A1111 would load that checkpoint, imagesmith cannot."""
    if not isinstance(value, str):
        raise ApiError(
            422,
            "invalid_request",
            f"sd_model_checkpoint must be a string, the model's title or filename as GET /sdapi/v1/sd-models "
            f"lists it (or null for no change), not {type(value).__name__} {json.dumps(value)[:80]}",
            "sd_model_checkpoint",
        )
    models = _models(request)
    title, source = models[0] if models else ("", "")
    if _names(value, title, source):
        return
    refiner = ""
    if len(models) > 1 and _names(value, *models[1]):
        refiner = " (it is the refiner: name it in txt2img's refiner_checkpoint)"
    served = f"{title!r} (filename {source!r})" if source and source != title else repr(title or source)
    raise ApiError(
        422,
        "invalid_request",
        f"sd_model_checkpoint: {value!r} is not the model served here{refiner}. imagesmith serves one base "
        f"model, {served}, chosen when it starts; to use another, set {ENV_PREFIX}BASE_MODEL to its hub id or "
        f"local diffusers folder (with {ENV_PREFIX}MODEL=sdxl) and restart the server",
        "sd_model_checkpoint",
    )


@router.post("/options")
async def set_options(
    request: Request, settings: SettingsDep, body: Annotated[dict[str, Any], Body()]
) -> None:
    """Accepted as A1111 clients send it (webuiapi's set_options, util_set_model), and answered as A1111 does
    (null), but nothing changes: sd_model_checkpoint must name the model served (another is refused, with the
    fix), and every other option is ignored, with one warning in the log naming those set to a new value."""
    _refuse_unsendable_options(body)
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint is not None:  # null is no change, as A1111 takes it (and txt2img's override here)
        _check_checkpoint(request, checkpoint)
    current = _current_options(request, settings)
    changed = sorted(
        key for key, value in body.items() if key != "sd_model_checkpoint" and current.get(key, ...) != value
    )
    if changed:
        log.warning(
            "POST /sdapi/v1/options: ignoring %s (imagesmith's options are fixed)", ", ".join(changed)
        )


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    """No A1111 scripts or extensions here (clients such as webuiapi ask at start-up)."""
    return {"txt2img": [], "img2img": []}
