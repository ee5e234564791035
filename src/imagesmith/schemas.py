"""The request and result models shared by the engine, the CLI and the HTTP API.

A request is validated once, here. Every error names its field and says how to fix it, in the style of
diffusers' own checks ("width must be a multiple of 8, got 1001; the nearest valid values are 1000 and 1008").
"""

from __future__ import annotations

import re
import secrets
import typing
import unicodedata
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_SEED = 2**63 - 1
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_PROMPT_CHARS = 2000
DEFAULT_STEPS_HIGH_QUALITY = 40
DEFAULT_STEPS_DRAFT = 30
MAX_STEPS = 150
# The schema's ceiling on num_images, well above any server's own limit (max_images_per_request, at most 4): a
# request past that limit reaches the server's check, whose message names it; this cap at 4 answered 5 with
# "less than or equal to 4" where the server's limit was 2. 32: as many as one pipeline pass holds.
MAX_NUM_IMAGES = 32


def draw_seed() -> int:
    """A 63-bit seed: large enough that two requests practically never collide (cog draws 16 bits)."""
    return secrets.randbits(63)


def splits_into_two_stages(steps: int, high_noise_frac: float) -> bool:
    """Whether the ensemble's split leaves both the base and the refiner at least one step (as the schema
    reckons it; the scheduler's own timesteps have the last word, engine.empty_stage)."""
    base_steps = int(steps * high_noise_frac)
    return 1 <= base_steps < steps


class RefineMode(StrEnum):
    """How the refiner takes part.

    ENSEMBLE: the base denoises the first high_noise_frac of the schedule and hands its noisy latents to the
    refiner, which finishes the same schedule (SDXL's "ensemble of expert denoisers"; no step is wasted).
    IMG2IMG: the seed's way: a full base pass, then the refiner re-noises to refine_strength and denoises again.
    NONE: base only.
    """

    ENSEMBLE = "ensemble"
    IMG2IMG = "img2img"
    NONE = "none"


class SchedulerName(StrEnum):
    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    DDIM = "ddim"
    UNIPC = "unipc"


class OutputFormat(StrEnum):
    PNG = "png"
    WEBP = "webp"
    JPEG = "jpeg"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"

    @classmethod
    def for_suffix(cls, suffix: str, default: OutputFormat) -> OutputFormat:
        """The format a file name's suffix asks for ('.jpg' and '.jpeg' both JPEG); `default` when the name
        has no suffix. A suffix of another format is refused (ValueError): writing PNG bytes into 'x.gif'
        would give a file its own name lies about."""
        name = suffix.lower().lstrip(".")
        if not name:
            return default
        if name == "jpg":
            return cls.JPEG
        if name in {member.value for member in cls}:
            return cls(name)
        raise ValueError(f"{suffix} is not a format imagesmith writes; name the file .png, .jpg or .webp")


class AspectPreset(StrEnum):
    """Named sizes from SDXL's training buckets (about one megapixel each), suited to blog images."""

    SQUARE = "square"
    LANDSCAPE = "landscape"
    WIDE = "wide"
    ULTRAWIDE = "ultrawide"
    PORTRAIT = "portrait"
    TALL = "tall"


ASPECT_SIZES: dict[AspectPreset, tuple[int, int]] = {
    AspectPreset.SQUARE: (1024, 1024),
    AspectPreset.LANDSCAPE: (1216, 832),  # about 3:2, a classic blog hero
    AspectPreset.WIDE: (1344, 768),  # about 16:9, social cards and wide headers
    AspectPreset.ULTRAWIDE: (1536, 640),  # about 21:9, banners
    AspectPreset.PORTRAIT: (832, 1216),
    AspectPreset.TALL: (768, 1344),
}


def check_side(name: str, value: int) -> int:
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise ValueError(f"{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {value}")
    if value % 8:
        low, high = value // 8 * 8, value // 8 * 8 + 8
        raise ValueError(
            f"{name} must be a multiple of 8, got {value}; the nearest valid values are {low} and {high}"
        )
    return value


def _is_number_field(annotation: object) -> bool:
    """int or float, alone or in a union (int | None), and not bool: a str field keeps pydantic's own message."""
    kinds = {annotation, *typing.get_args(annotation)}
    return bool(kinds & {int, float}) and bool not in kinds


class RefusesBooleanNumbers(BaseModel):
    """A request model whose number fields refuse true and false. Pydantic's lax mode reads true as 1:
    {"seed": true} ran seed 1, and {"width": true} was refused as "got 1". Every request model of the API and
    the library derives from it; fields declared bool keep their booleans, and others (a prompt) pydantic's
    own message."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _is_number_field(field.annotation):
            raise ValueError(f"must be a number, got {str(value).lower()} (a boolean)")
        return value


def seed_not_negative(value: object) -> object:
    """A seed field's check before pydantic's own: a negative seed is refused with the way to a random one.
    A1111 users send -1 for "random"; pydantic's "greater than or equal to 0" gave no way forward. (The A1111
    route maps its -1 itself; elsewhere a missing seed is the random one.)"""
    number = value
    if isinstance(value, str):  # JSON's "-1": pydantic reads an integer string as the integer
        try:
            number = int(value.strip())
        except ValueError:
            return value  # not a number: pydantic's own message
    if isinstance(number, int | float) and not isinstance(number, bool) and number < 0:
        raise ValueError(f"must be 0 or more, got {value!r}; leave the seed out for a random one")
    return value


class GenerationRequest(RefusesBooleanNumbers):
    """One generation: what the user asked for. `resolve()` fills the defaults that depend on other fields."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    width: int | None = Field(None, description="Multiple of 8; default 1024, or the aspect preset's.")
    height: int | None = Field(None, description="Multiple of 8; default 1024, or the aspect preset's.")
    aspect: AspectPreset | None = Field(None, description="Named size; conflicts with explicit width/height.")
    num_inference_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Total steps of the schedule (40, or 30 when high_quality is false).",
    )
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    refine_mode: RefineMode | None = Field(
        None, description="ensemble (default), img2img or none; use_refinement=false means none."
    )
    high_noise_frac: float = Field(0.8, gt=0.0, lt=1.0, description="Ensemble: share of steps the base runs.")
    refine_steps: int = Field(30, ge=1, le=150, description="img2img mode: refiner steps before strength.")
    refine_strength: float = Field(0.3, gt=0.0, le=1.0, description="img2img mode: how much to re-noise.")
    scheduler: SchedulerName = SchedulerName.EULER
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image i uses seed + i; drawn if missing.")
    num_images: int = Field(
        1, ge=1, le=MAX_NUM_IMAGES, description="Images to make; at most the server's max_images_per_request."
    )
    output_format: OutputFormat = OutputFormat.PNG
    high_quality: bool = Field(True, description="False: 30 steps and no refiner unless asked explicitly.")
    use_refinement: bool = Field(True, description="False: base only, whatever refine_mode says.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        # Format characters (a zero-width space, a byte-order mark) and control characters ("\u0000") show
        # nothing either: "\u200b" and "\u0000" were prompts.
        if not any(not char.isspace() and unicodedata.category(char) not in ("Cf", "Cc") for char in value):
            raise ValueError("prompt must contain text, got only whitespace or invisible characters")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _negative_seed_says_how_to_get_a_random_one(cls, value: object) -> object:
        return seed_not_negative(value)

    @field_validator("width", "height")
    @classmethod
    def _side_valid(cls, value: int | None, info: Any) -> int | None:
        return None if value is None else check_side(info.field_name, value)

    @model_validator(mode="after")
    def _consistent(self) -> GenerationRequest:
        if self.aspect is not None and (self.width is not None or self.height is not None):
            preset = ASPECT_SIZES[self.aspect]
            if (self.width, self.height) != preset:
                raise ValueError(
                    f"[aspect] aspect '{self.aspect.value}' means {preset[0]}x{preset[1]}; "
                    "give either aspect or width/height, not both"
                )
        resolved = self.resolve()
        steps = resolved.num_inference_steps
        if resolved.refine_mode is RefineMode.ENSEMBLE and not splits_into_two_stages(
            steps, self.high_noise_frac
        ):
            raise ValueError(self._empty_stage_message(steps))
        if resolved.refine_mode is RefineMode.IMG2IMG and int(self.refine_steps * self.refine_strength) < 1:
            raise ValueError(
                f"[refine_strength] refine_strength {self.refine_strength} x refine_steps {self.refine_steps} is under one "
                "refiner step; raise refine_steps or refine_strength"
            )
        return self

    def _empty_stage_message(self, steps: int) -> str:
        """Blame what the client chose: the split if they set it, else the steps; the fix names the fewest
        steps that work at this split, since "raise the steps" alone left them guessing (and "move
        high_noise_frac toward 0.8" was no help when it was 0.8)."""
        frac_chosen = "high_noise_frac" in self.model_fields_set
        split = f"high_noise_frac {self.high_noise_frac}" + ("" if frac_chosen else " (the default)")
        fewest = next(
            (n for n in range(steps + 1, MAX_STEPS + 1) if splits_into_two_stages(n, self.high_noise_frac)),
            None,
        )
        fixes = [f"raise num_inference_steps to {fewest} or more"] if fewest is not None else []
        if frac_chosen or fewest is None:
            fixes.append("move high_noise_frac closer to 0.5")
        field = "high_noise_frac" if frac_chosen else "num_inference_steps"
        return f"[{field}] {steps} step(s) at {split} leave the base or the refiner no step; {', or '.join(fixes)}"

    def resolve(self) -> ResolvedRequest:
        """Fill the defaults that depend on other fields, so the engine sees one explicit plan."""
        width, height = ASPECT_SIZES[self.aspect] if self.aspect else (1024, 1024)
        width, height = self.width or width, self.height or height
        steps = self.num_inference_steps or (
            DEFAULT_STEPS_HIGH_QUALITY if self.high_quality else DEFAULT_STEPS_DRAFT
        )
        if not self.use_refinement:
            mode = RefineMode.NONE
        elif self.refine_mode is not None:
            mode = self.refine_mode
        else:
            mode = RefineMode.ENSEMBLE if self.high_quality else RefineMode.NONE
        data = self.model_dump(exclude={"aspect", "width", "height", "num_inference_steps", "refine_mode"})
        return ResolvedRequest(
            **data, width=width, height=height, num_inference_steps=steps, refine_mode=mode
        )


class ResolvedRequest(BaseModel):
    """A request with every default decided: what the engine runs and what the metadata records."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    refine_mode: RefineMode
    high_noise_frac: float
    refine_steps: int
    refine_strength: float
    scheduler: SchedulerName
    seed: int | None
    num_images: int
    output_format: OutputFormat
    high_quality: bool
    use_refinement: bool


class StageReport(BaseModel):
    """One stage as it really ran."""

    name: str  # "base", "refine", "base_finish" or "decode"
    steps: int  # the decode's: the images it decoded
    seconds: float

    def __str__(self) -> str:  # as the CLI and the engine's log line say it
        unit = "image" if self.name == "decode" else "step"
        return f"{self.name} {self.steps} {unit}{'' if self.steps == 1 else 's'} {self.seconds:.2f}s"


class ImageReport(BaseModel):
    index: int
    seed: int
    refined: bool
    not_refined_reason: str | None = None
    decoded_in_fp32_retry: bool = False
    width: int
    height: int


class GenerationMetadata(BaseModel):
    """What really ran: the record the CLI prints, the API returns and the image file embeds."""

    request: ResolvedRequest
    refine_mode_ran: RefineMode
    refined: bool
    not_refined_reason: str | None = None
    seeds: list[int]
    stages: list[StageReport]
    batch_size: int = 1  # images computed in the same pipeline pass (several requests when batched)
    total_seconds: float
    base_model: str
    refiner_model: str | None
    device: str
    dtype: str
    images: list[ImageReport]


class FieldError(BaseModel):
    field: str
    message: str


def blame(field: str, pydantic_message: str) -> tuple[str, str]:
    """The field to blame and the message, from one pydantic error.

    Checks that span several fields run after the fields themselves, where pydantic has no location to give;
    they name their field as "[field] message", and that name wins."""
    message = pydantic_message.removeprefix("Value error, ")
    tagged = _FIELD_TAG.match(message)
    return (tagged.group(1), tagged.group(2)) if tagged else (field, message)


def field_errors(error: ValidationError) -> list[FieldError]:
    """Flatten pydantic's errors into field + message pairs that a person can act on."""
    out = []
    for item in error.errors():
        field, message = blame(".".join(str(part) for part in item["loc"]) or "request", str(item["msg"]))
        out.append(FieldError(field=field, message=message))
    return out


_FIELD_TAG = re.compile(r"^\[(\w+)\] (.*)$", re.DOTALL)
_FIELD_NAME = re.compile(r"\b[a-z][a-z_]*\b")


def in_callers_names(message: str, names: Mapping[str, str]) -> str:
    """`message` with each field name in `names` replaced by what the caller calls it: an A1111 client sends
    `steps`, the CLI's user types `--steps`; "raise num_inference_steps" helps neither."""
    return _FIELD_NAME.sub(lambda word: names.get(word.group(0), word.group(0)), message)
