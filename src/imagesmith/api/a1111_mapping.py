"""AUTOMATIC1111's txt2img request, mapped onto a generation job; and its answer (images, parameters, info).

What maps to what:
- steps -> num_inference_steps (the whole schedule, base plus refiner, as in A1111); cfg_scale -> guidance_scale.
- sampler_name (or the older sampler_index) + scheduler -> our scheduler: "Euler", "Euler a", "DPM++ 2M",
  "DPM++ 2M Karras", "DDIM", "UniPC" (A1111's aliases such as "k_euler_a" too, any case); newer A1111's
  sampler "DPM++ 2M" + scheduler "Karras" is "DPM++ 2M Karras"; scheduler "Automatic" (or none) keeps the
  sampler's own. Anything else is a 422 naming the valid ones: running another sampler than the one asked would
  give a different picture for the same seed, and the parameters would say what did not happen.
- seed -1 -> drawn at random; image i has seed + i (A1111's all_seeds). batch_size x n_iter images in one job,
  at most max_images_per_request.
- refiner_checkpoint + refiner_switch_at -> the ensemble split (high_noise_frac = refiner_switch_at, default
  0.8). refiner_checkpoint given but empty or "None", or refiner_switch_at >= 1: base only. refiner_checkpoint
  absent (most clients never send it): imagesmith's default, the refiner ensemble.
- width/height, steps, cfg_scale absent: imagesmith's defaults (the server's default size, not A1111's 512x512,
  which SDXL draws poorly).
- null in any field means its default, as if the key were absent (A1111's fields are all Optional; clients send
  null for unset ones): seed null is random. Except refiner_checkpoint null, which is A1111's "no refiner":
  base only.
- Tolerated and ignored: override_settings (one model: sd_model_checkpoint and the like change nothing),
  styles, subseed*, restore_faces, tiling, enable_hr and hr_*, eta, s_*, script_name/script_args,
  alwayson_scripts, save_images. send_images=false answers without the images, as A1111 does.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from imagesmith import __version__
from imagesmith.api.compat_request import generation_from
from imagesmith.api.errors import ApiError
from imagesmith.api.json_values import refuse_unsendable
from imagesmith.config import Settings
from imagesmith.engine.output import a1111_parameters, model_label
from imagesmith.engine.schedulers import A1111_SAMPLER_NAMES
from imagesmith.schemas import (
    GenerationMetadata,
    OutputFormat,
    RefineMode,
    RefusesBooleanNumbers,
    SchedulerName,
)
from imagesmith.sources.base import ImageRequest

log = logging.getLogger(__name__)

# A1111's own aliases for the samplers we have (modules/sd_samplers_kdiffusion.py and friends).
SAMPLER_ALIASES: dict[SchedulerName, list[str]] = {
    SchedulerName.EULER: ["k_euler"],
    SchedulerName.EULER_ANCESTRAL: ["k_euler_a", "k_euler_ancestral"],
    SchedulerName.DPMPP_2M: ["k_dpmpp_2m"],
    SchedulerName.DPMPP_2M_KARRAS: ["k_dpmpp_2m_ka"],
    SchedulerName.DDIM: ["ddim"],
    SchedulerName.UNIPC: ["unipc"],
}
# A1111 1.9+ splits the noise schedule off the sampler; we offer its "Automatic" and, for DPM++ 2M, "Karras".
SCHEDULERS = {"automatic": ("Automatic", -1.0), "karras": ("Karras", 7.0)}
_SAMPLER_LOOKUP: dict[str, SchedulerName] = {
    **{name.lower(): ours for ours, name in A1111_SAMPLER_NAMES.items()},
    **{alias: ours for ours, aliases in SAMPLER_ALIASES.items() for alias in aliases},
    **{ours.value: ours for ours in SchedulerName},
}
# GenerationRequest's field names, as A1111 calls them (so an error names the field the client sent).
A1111_FIELDS = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "high_noise_frac": "refiner_switch_at",
    "num_images": "batch_size",
}
_IGNORED_IF_SET = ("enable_hr", "restore_faces", "tiling", "script_name", "styles", "alwayson_scripts")


# Fields whose null A1111 reads as a choice, not as "unset": refiner_checkpoint null is "no refiner".
NULL_IS_MEANINGFUL = frozenset({"refiner_checkpoint"})


class Txt2ImgRequest(RefusesBooleanNumbers):
    """POST /sdapi/v1/txt2img: the fields A1111 clients send. Others are accepted (and echoed) but unused."""

    # Python's JSON reader takes NaN and Infinity, which JSON has not; echoed back in `info` they made a string
    # that strict parsers (JavaScript's, Go's) refuse. Declared numbers refuse them here, the rest below.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, description="-1: random; otherwise 0 to 2^63-1.")
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = Field(
        None, description="Older name of sampler_name; used when that is unset."
    )
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    override_settings: dict[str, Any] | None = None
    enable_hr: bool = False
    restore_faces: bool | None = None
    tiling: bool | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """A1111's request fields are all Optional, and its clients (JS/TS SDKs, generated ones) send null for
        what they leave unset: null in a field with a default is that default, as if the key were absent (seed
        null is random, as -1). Except refiner_checkpoint, whose null A1111 reads as "no refiner": kept, so it
        means base only here too. Null in an extra key is kept as sent; a wrong type that is not null still
        fails."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if not (
                value is None
                and key in fields
                and not fields[key].is_required()
                and key not in NULL_IS_MEANINGFUL
            )
        }

    @model_validator(mode="after")
    def _kept_values_are_finite(self) -> Txt2ImgRequest:
        """The fields kept as sent (the extras, override_settings, alwayson_scripts), echoed back in the answer, hold no
        NaN or Infinity and nest no deeper than json_values.MAX_NESTING."""
        kept = {
            **(self.model_extra or {}),
            "override_settings": self.override_settings,
            "alwayson_scripts": self.alwayson_scripts,
        }
        refuse_unsendable(kept)
        return self


def sampler_list() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers."""
    return [
        {
            "name": name,
            "aliases": SAMPLER_ALIASES[ours],
            "options": {"scheduler": "karras"} if ours is SchedulerName.DPMPP_2M_KARRAS else {},
        }
        for ours, name in A1111_SAMPLER_NAMES.items()
    ]


def scheduler_list() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers."""
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": False}
        for name, (label, rho) in SCHEDULERS.items()
    ]


def resolve_sampler(sampler: str | None, scheduler: str | None) -> SchedulerName:
    name = (sampler or "Euler").strip()
    ours = _SAMPLER_LOOKUP.get(name.lower())
    if ours is None:
        valid = ", ".join(repr(n) for n in A1111_SAMPLER_NAMES.values())
        raise ApiError(
            422, "invalid_request", f"sampler {name!r} is not available here; valid: {valid}", "sampler_name"
        )
    schedule = (scheduler or "automatic").strip().lower().replace(" ", "_")
    if schedule == "automatic":
        return ours
    if schedule == "karras" and ours in (SchedulerName.DPMPP_2M, SchedulerName.DPMPP_2M_KARRAS):
        return SchedulerName.DPMPP_2M_KARRAS
    raise ApiError(
        422,
        "invalid_request",
        f"scheduler {scheduler!r} is not available with sampler {A1111_SAMPLER_NAMES[ours]!r}; valid: "
        "'Automatic' with any sampler, 'Karras' with 'DPM++ 2M'",
        "scheduler",
    )


def _refinement(body: Txt2ImgRequest) -> dict[str, Any]:
    switch_at = body.refiner_switch_at
    if "refiner_checkpoint" not in body.model_fields_set:  # this server's refiner, as configured
        if switch_at is None:
            return {}
        # A1111: a switch at 1 or later never reaches the refiner, so the base alone makes the image.
        return {"refine_mode": RefineMode.NONE} if switch_at >= 1 else {"high_noise_frac": switch_at}
    if not body.refiner_checkpoint or body.refiner_checkpoint == "None" or (switch_at or 0) >= 1:
        return {"refine_mode": RefineMode.NONE}
    if switch_at is None:
        # The schema's default split (0.8, A1111's too), left unset: an error then blames the steps.
        return {"refine_mode": RefineMode.ENSEMBLE}
    return {"refine_mode": RefineMode.ENSEMBLE, "high_noise_frac": switch_at}


def to_image_request(body: Txt2ImgRequest, settings: Settings) -> ImageRequest:
    count = body.batch_size * body.n_iter
    if count > settings.max_images_per_request:
        raise ApiError(
            422,
            "limit_exceeded",
            f"batch_size x n_iter is {body.batch_size} x {body.n_iter} = {count} images; this server makes at "
            f"most {settings.max_images_per_request} per request",
            "batch_size",
        )
    ignored = [name for name in _IGNORED_IF_SET if getattr(body, name)]
    if body.subseed_strength:  # A1111 mixes in a variation seed's noise: another picture there
        ignored.append(f"subseed_strength {body.subseed_strength}")
    if body.override_settings:  # e.g. sd_model_checkpoint: another model there, imagesmith has one
        ignored.append(f"override_settings ({', '.join(sorted(body.override_settings))})")
    if ignored:
        log.warning("txt2img: ignoring %s (not supported by imagesmith)", ", ".join(ignored))
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "width": body.width,
        "height": body.height,
        "num_inference_steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "scheduler": resolve_sampler(body.sampler_name or body.sampler_index, body.scheduler),
        "seed": None if body.seed == -1 else body.seed,
        "num_images": count,
        "output_format": OutputFormat.PNG,  # A1111's API answers with PNGs
        **_refinement(body),
    }
    given = {name: value for name, value in fields.items() if value is not None}
    return generation_from(given, A1111_FIELDS, 422, "invalid_request")


def info(body: Txt2ImgRequest, meta: GenerationMetadata, started_at: float | None) -> str:
    """A1111's `info`: a JSON string (Processed.js()) describing what ran, one infotext per image."""
    request = meta.request
    count = len(meta.seeds)
    extra: dict[str, Any] = {}
    if meta.refined and meta.refiner_model:
        extra["Refiner"] = model_label(meta.refiner_model)
        if meta.refine_mode_ran is RefineMode.ENSEMBLE:
            extra["Refiner switch at"] = request.high_noise_frac
    record = {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": meta.seeds[0],
        "all_seeds": meta.seeds,
        "subseed": body.subseed,
        "all_subseeds": [body.subseed] * count,
        "subseed_strength": body.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": A1111_SAMPLER_NAMES[request.scheduler],
        "cfg_scale": request.guidance_scale,
        "steps": request.num_inference_steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_label(meta.base_model),
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": [a1111_parameters(meta, index) for index in range(count)],
        "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started_at or time.time())),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"imagesmith {__version__}",
    }
    return json.dumps(record)
