"""Settings: every knob in one place, read from IMAGESMITH_* environment variables (or a .env file).

Read them through get_settings(), never at import time, so tests and the CLI can override them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from PIL import Image
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from imagesmith.schemas import check_side

# The most pixels Pillow opens at all (twice its MAX_IMAGE_PIXELS: above that Image.open raises
# DecompressionBombError before imagesmith's own cap is read), so IMAGESMITH_PEXELS_MAX_IMAGE_PIXELS stops there.
PILLOW_PIXEL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 500_000_000)

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER_MODEL = "stabilityai/stable-diffusion-xl-refiner-1.0"
DEFAULT_PEXELS_API_BASE_URL = "https://api.pexels.com/v1"


class ModelPreset(StrEnum):
    """Which weights to run: the real SDXL models named by base_model/refiner_model, or the built-in tiny pair."""

    SDXL = "sdxl"
    TINY = "tiny"


class PrecisionChoice(StrEnum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class OffloadChoice(StrEnum):
    AUTO = "auto"
    NONE = "none"
    MODEL = "model"
    SEQUENTIAL = "sequential"


class VaeTilingChoice(StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


ENV_PREFIX = "IMAGESMITH_"
MAX_NAME_BYTES = 255  # the longest file or folder name ext4, XFS, btrfs and tmpfs take (NAME_MAX)
MAX_BATCH_IMAGES = 32  # the most images one pipeline pass may hold (IMAGESMITH_BATCH_MAX_IMAGES)
DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class CompileChoice(StrEnum):
    """torch.compile of the UNets and VAE decoder. 'reduce-overhead' adds CUDA graphs for the UNets (batch-1
    latency; the decoder compiles without, engine/fast.py's decoder_compile_mode says why);
    'max-autotune' also times Triton templates against cuBLAS/cuDNN for every matmul and convolution (a much
    longer first start)."""

    OFF = "off"
    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE = "max-autotune"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


class Fp8Scales(StrEnum):
    """How fp8 linears scale their inputs (engine/fp8.py). 'static': one scale per layer, calibrated at start-up
    from a real generation, so the quantization is a multiply and a cast that the compiler fuses into the kernel
    producing the input. 'dynamic': scales computed from every input (per row on Hopper), a reduction pass
    before each matmul."""

    STATIC = "static"
    DYNAMIC = "dynamic"


class AttentionBackendChoice(StrEnum):
    """The fused kernel scaled_dot_product_attention tries first (engine/attention.py). 'auto' keeps torch's
    own choice, which depends on the torch and cuDNN build (cuDNN's kernel on Hopper with cuDNN 9.15+). 'fa4'
    runs the UNets' attention through FlashAttention-4's Hopper kernel (engine/fa4_attention.py), a separate
    package."""

    AUTO = "auto"
    FLASH = "flash"
    EFFICIENT = "efficient"
    CUDNN = "cudnn"
    FA4 = "fa4"


# Compile modes that record CUDA graphs.
CUDA_GRAPH_MODES = (CompileChoice.REDUCE_OVERHEAD, CompileChoice.MAX_AUTOTUNE)


def comma_list(text: str) -> list[str]:
    """'a, b,,c ' -> ['a', 'b', 'c']: how every list-valued setting is written in the environment."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_size(text: str) -> tuple[int, int]:
    """'1216x832' -> (1216, 832). Settings use this form for image sizes."""
    width, sep, height = text.strip().lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise ValueError(f"a size looks like 1216x832 (width x height in pixels), not {text.strip()!r}")
    return int(width), int(height)


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "imagesmith"


class UnusableSetting(ValueError):
    """A setting that is valid as written but cannot be used on this machine; the message names it and the fix."""


def prepared_data_dir(data_dir: Path, said_as: str = f"{ENV_PREFIX}DATA_DIR") -> Path:
    """IMAGESMITH_DATA_DIR, made if missing; a folder that cannot be made or written is said as a setting to
    change (`said_as`: the option, where one set it) rather than a FileNotFoundError from deep in a start."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UnusableSetting(
            f"{said_as}: cannot create {data_dir} ({error.strerror or error}); set it to a folder "
            "this user can write"
        ) from error
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise UnusableSetting(
            f"{said_as}: {data_dir} is not writable by this user; set it to a folder this user can write"
        )
    # The service keeps its images in DATA_DIR/images: something else there ended its start in a traceback.
    images = data_dir / "images"
    if images.exists() and not images.is_dir():
        raise UnusableSetting(
            f"{said_as}: {images} is a file, where the service keeps its images in a folder; move that file "
            "away, or set another data dir"
        )
    if images.is_dir() and not os.access(images, os.W_OK | os.X_OK):
        raise UnusableSetting(
            f"{said_as}: {images} (the service's images) is not writable by this user; give this user write "
            "access to it, or set another data dir"
        )
    return data_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    model: ModelPreset = Field(
        ModelPreset.SDXL, description="'sdxl' uses base_model/refiner_model; 'tiny' the built-in noise model."
    )
    base_model: str = Field(DEFAULT_BASE_MODEL, description="Hub id or local diffusers folder of the base.")
    refiner_model: str = Field(
        DEFAULT_REFINER_MODEL, description="Hub id or local folder of the refiner; empty for none."
    )
    vae_model: str = Field(
        "", description="Optional separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix."
    )
    vae_fp16_safe: bool | None = Field(
        None,
        description="Whether the VAE decodes in fp16 without overflow. Default: true when vae_model is set.",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'.")
    precision: PrecisionChoice = Field(PrecisionChoice.AUTO, description="Weights and compute dtype.")
    offload: OffloadChoice = Field(OffloadChoice.AUTO, description="Where weights live between uses.")
    vae_tiling: VaeTilingChoice = Field(VaeTilingChoice.AUTO, description="Decode large images in tiles.")
    data_dir: Path = Field(default_factory=default_data_dir, description="Jobs, images, the tiny model.")
    hf_offline: bool = Field(False, description="Never contact the hub (HF_HUB_OFFLINE=1 does the same).")

    # --- HTTP service (imagesmith serve) ---
    host: str = Field(
        "127.0.0.1", description="Address to bind; forced to 127.0.0.1 while api_keys is empty."
    )
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_keys: str = Field(
        "",
        description="Comma-separated API keys; when set, every endpoint but health and image URLs needs a "
        "Bearer key.",
    )
    image_urls_need_key: bool = Field(
        False,
        description="Image URLs (/v1/images/<sha256>.<ext>) need the Bearer key too. Off: they are "
        "unguessable capability URLs a client downloads without a key, as with OpenAI's image URLs.",
    )
    queue_max: int = Field(32, ge=1, description="Jobs queued or running at once; past it, 429.")
    max_attempts: int = Field(3, ge=1, description="Runs of one job across crashes before it is failed.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body accepted.")
    max_prompt_chars: int = Field(
        2000,
        ge=1,
        le=2000,
        description="Longest prompt or negative prompt the HTTP API accepts (the CLI and library take up to 2000).",
    )
    max_images_per_request: int = Field(4, ge=1, le=4, description="Most images one request may ask for.")
    default_width: int = Field(1024, ge=64, le=2048, description="Width when a request gives no size.")
    default_height: int = Field(1024, ge=64, le=2048, description="Height when a request gives no size.")
    stock_default_size: str = Field(
        "1216x832",
        description="WxH when a request that may be served by Pexels gives no size (a landscape blog hero); "
        "empty: default_width x default_height.",
    )
    # After the default sizes: its check compares them with it (a field sees only those defined before it).
    max_total_pixels: int = Field(
        4 * 1024 * 1024, ge=64 * 64, description="width x height x num_images allowed per request."
    )
    batch_max_images: int = Field(
        8,
        ge=1,
        le=MAX_BATCH_IMAGES,
        description="Images of compatible queued jobs run as one pipeline pass (1: no batching).",
    )
    batch_window_ms: int = Field(
        20,
        ge=0,
        le=5000,
        description="How long a batchable job may wait for compatible company, counted from its submission: "
        "queued company joins at once, and a job that has already waited this long in the queue does not wait "
        "again.",
    )
    finish_in_background: bool = Field(
        True,
        description="Encode a pass's files and end its jobs on a second thread while the GPU runs the next pass "
        "(off: the GPU waits for each pass's encoding: 1.27 instead of 1.34 images/s at batch 1 on an H200).",
    )
    claim_before_hand_over: bool = Field(
        True,
        description="With finish_in_background: claim the next pass's jobs before handing the last pass to the "
        "finishing thread, so the claim does not wait for the GIL while PNGs are written (measured on an H100 at "
        "batch 8: each claim 0.5-1.5 ms instead of up to 9 ms, the worker's time between passes 15 instead of "
        "17 ms, run 85). A claim that waits for company hands over before it waits.",
    )
    preview_every: int = Field(5, ge=0, description="Steps between SSE preview images; 0 turns them off.")
    preview_max_side: int = Field(128, ge=16, le=512, description="Longest side of a preview image.")
    wait_timeout_s: float = Field(
        900.0,
        gt=0,
        description="How long POST /api/media/generate-image and A1111's txt2img wait before answering 504.",
    )
    openai_wait_timeout_s: float = Field(
        570.0,
        gt=0,
        description="How long POST /v1/images/generations waits before answering 504 (x-should-retry: false; "
        "the job goes on). Below the official openai clients' 600 s timeout: past it they send the request "
        "again, and each try would be a new job. Raise it only with the clients' timeout.",
    )
    log_format: LogFormat = Field(
        LogFormat.TEXT,
        description="The server's log (`imagesmith serve`): 'text' for people or 'json' for log collectors. "
        "The other commands log text to stderr, beside their progress bars.",
    )

    # Speed levers (engine/fast.py); figures in docs/benchmarks.md.
    fuse_qkv: bool | None = Field(
        None,
        description="One matmul for Q, K and V in each attention block (exact). Default: on with compile.",
    )
    compile: CompileChoice = Field(CompileChoice.OFF, description="torch.compile the UNets and VAE decoder.")
    decoder_math_attention: bool = Field(
        True,
        description="Compile the VAE decoder's one attention (a single head 512 wide, which no flash kernel "
        "takes) as two matmuls and a softmax instead of the memory-efficient kernel (exact, within bf16 "
        "rounding), for bf16 decodes of up to 128x128 latents; larger ones keep the kernel. Only with compile. "
        "Measured on an H100: the 1024x1024 decode 38.8 -> 36.0 ms.",
    )
    timed_reductions: bool | None = Field(
        None,
        description="Compile each reduction kernel of the compiled UNets and VAE decoder (the layer and group "
        "norms, softmaxes) both held in registers and as a loop, and keep whichever runs faster on its first "
        "call, at start-up (inductor's multi-kernel; this setting decides it, over TORCHINDUCTOR_MULTI_KERNEL). "
        "Exact within rounding: the same sums in another order, not bit-identical. Only with compile. Measured: "
        "the 40-step ensemble 1.313 -> 1.298 s on an H100 (run 95), 1.302 -> 1.263 s on an H200 (run 103), the "
        "same 49.5 dB from eager bf16; a cold warm-up of the one-image graphs as long as without (run 110), of "
        "the batched ones longer. Default: on with compile (since session 46, when the whole GPU test suite "
        "passed under it, runs 107-109); false turns it off. Changing it changes the compile cache's keys.",
    )
    fused_geglu: bool | None = Field(
        None,
        description="Each transformer block's feed-forward runs its first bf16 matmul and GEGLU as one Triton "
        "kernel (engine/bf16_geglu.py) instead of a cuBLAS matmul writing the doubled product and a second pass "
        "reading it back. Exact within bf16 rounding (one rounding fewer). Measured on an H100: the 40-step "
        "ensemble 1.301 -> 1.280 s at the same fidelity (run 98). Default: on with compile on a Hopper GPU "
        "(compute capability 9.x) with Triton, bf16 weights, no offload and no fp8 linears "
        "(IMAGESMITH_FP8_FUSED_GEGLU is theirs); true also tries newer GPUs (9.0+, unmeasured). At start-up the "
        "kernel runs once against an fp32 reference: where it fails, the default starts without it (a warning "
        "in the log) and true refuses to start.",
    )
    empty_negative_shortcut: bool = Field(
        True,
        description="With no negative prompt, the base UNet's cross-attentions run for the guided rows only: the "
        "others get zeros for text, for which a cross-attention's output is exactly its projection's bias "
        "(engine/empty_negative.py). Exact: the same 49.5 dB from eager bf16 as without, and eager bf16 bit for "
        "bit (run 116). Measured on an H100 with compile, one process: the 40-step ensemble 1.296 -> 1.272 s "
        "(run 116). Requests with a negative prompt, or unguided, run as before and gain nothing. With compile "
        "the warm-up compiles the base's graphs for both kinds of pass, so nothing compiles on a request: a cold "
        "one-image warm-up 316 -> 377 s (run 117). Default: on (since session 49); false turns it off. Skipped "
        "with sequential offload.",
    )
    compile_dynamic: bool = Field(
        False,
        description="Compile the UNets with dynamic shapes from the first compile, so the batched warm-up "
        "needs no second compile (batch_max_images > 1). Not yet measured on a GPU, nor its cost per image.",
    )
    compile_regions: bool = Field(
        False,
        description="Compile each kind of UNet transformer block once and reuse it for the others (torch's "
        "nested compile regions): on an H200 the base UNet's cold compile 78 s instead of 123 s, at +0.5 ms a "
        "UNet call (~1.5 % an image). For servers that start often.",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="Compiled kernels; default DATA_DIR/compile-cache (one subfolder per attention backend).",
    )
    channels_last: bool | None = Field(
        None,
        description="NHWC memory layout for the UNets' weights. Default: on with compile (offload none), off "
        "without. Compiled graphs gain: a static graph copied NCHW convolution weights into channels-last on "
        "every call (with channels-last weights an ensemble image took 1.328 s against 1.357 s, run 89, an H100), "
        "and the graph shared by sizes outside the warm-up, left NCHW, paid layout transposes (channels-last: its "
        "base UNet compiled in 318 s against 453 s and ran +8.8 ms a call against the static graph where NCHW ran "
        "+10.3, runs 87-88). A size that runs uncompiled loses a little (a 1024x960 request 2.42 against 2.39 s, "
        "run 90). Changing it changes the compile cache's keys: the next start compiles cold.",
    )
    attention_backend: AttentionBackendChoice = Field(
        AttentionBackendChoice.AUTO,
        description="Attention kernel tried first on a CUDA GPU: auto (torch's choice), flash, efficient or "
        "cudnn (exact, each within bf16 rounding); fa4 runs the UNets' attention through FlashAttention-4 on a "
        "Hopper GPU (the flash-attn-4 package, installed separately).",
    )
    cudnn_benchmark: bool | None = Field(
        None,
        description="cuDNN times its convolution algorithms per shape and keeps the fastest (exact). "
        "Default: on with compile on a CUDA GPU, except the CUDA-graph modes (reduce-overhead, max-autotune), "
        "which refuse it: a convolution timed during a graph capture fails the capture.",
    )
    text_encoder_graphs: bool | None = Field(
        None,
        description="Replay the text encoders as CUDA graphs, one per encoder at one prompt's shape (exact: the "
        "same kernels as eager, without their launch cost). Default: on with a CUDA-graph compile mode "
        "(reduce-overhead, max-autotune) on a CUDA GPU; needs offload none. Measured: 1.455 -> 1.381 s an image "
        "(run 42), +2-5 % images/s in the queue with new prompts (run 41).",
    )
    fp8: bool = Field(
        False,
        description="fp8 (e4m3) linears in the UNets' transformer blocks (lossy, PSNR ~44 dB against bf16; compute "
        "capability 8.9+). With reduce-overhead, measured: the ensemble 1.38 -> 1.21 s, the MLPerf setting at batch 8 "
        "1.61 -> 1.91 images/s (runs 46-47). Without compile it only saves memory: slower than bf16 (run 47). It "
        "lowers the free memory needed to run resident from 16 to 12 GiB.",
    )
    fp8_scales: Fp8Scales = Field(
        Fp8Scales.STATIC,
        description="With fp8: 'static' scales each layer's inputs by one factor calibrated at start-up (one "
        "generation, seconds), 'dynamic' computes them from every input (a reduction before each matmul).",
    )
    fp8_convs: bool = Field(
        False,
        description="With fp8 and static scales: the UNets' convolutions in fp8 too, through cuDNN's fp8 kernels "
        "(Hopper, compute capability 9.0+; needs `pip install 'imagesmith[fp8-convs]'`). Lossy, like fp8. Measured "
        "with reduce-overhead at the MLPerf setting, batch 8: 1.889 -> 1.927 images/s (run 52), 1.948 with "
        "channels-last kept (run 53); image 36.7 dB from eager bf16 (fp8 linears alone: 42.4). The first start "
        "is longer: cuDNN's plans are chosen per shape and batch size (~2.4 s each, run 56; 52 s for the base "
        "UNet at one batch size; a service warming batch 1-8 and the refiner meets ~8x as many, and times only at "
        "sizes more than 2x from one already timed, building the others' plans by name; unmeasured whole), then "
        "remembered beside the compile cache for the next start.",
    )
    fp8_fused_geglu: bool = Field(
        False,
        description="With fp8 and static scales: each transformer block's feed-forward runs its first fp8 matmul "
        "and GEGLU as one Triton kernel writing e4m3 for the second (engine/fp8_geglu.py), instead of a cuBLAS "
        "matmul writing bf16 and a second pass reading it back. The same arithmetic without the bf16 rounding "
        "between them. Measured: 14.5 ms less per batch-16 base UNet call alone (run 58); in the engine, one "
        "process, 2.3 ms a call (-1.3 %) and +0.5 % images/s at the MLPerf setting (run 63).",
    )
    cpu_threads: int = Field(
        0,
        ge=0,
        le=1024,  # libgomp aborted at 20000 and the process segfaulted at 40000, with no word of the setting
        description="Threads for torch's CPU operators (at most 1024). 0: the CPUs this process may really use, the least of "
        "torch's count, the affinity mask and the container's CPU quota (cgroup cpu.max), since torch counts "
        "the host's cores and a throttled thread team stalls the GPU pass waiting on it (engine/cpu_threads.py).",
    )
    prompt_cache_size: int = Field(
        64, ge=0, description="Prompt embeddings kept on the device for repeated prompts (0: off)."
    )
    encode_ahead: bool = Field(
        True,
        description="Encode the queued jobs' prompts between the running pass's steps, so the next pass finds them "
        "in the prompt cache (exact; needs the prompt cache and no offload). Measured with the text encoders' "
        "graphs: +1-2 % images/s at batch 1, 4 and 8 with new prompts (run 41).",
    )
    warmup: bool = Field(True, description="Warm up (and compile) at start-up, before serving.")
    warmup_sizes: str = Field(
        "1024x1024",
        description="Comma-separated WxH shapes to warm up. Each gets graphs compiled for it (a static graph's "
        "compile time per size); other sizes run uncompiled unless IMAGESMITH_WARMUP_ANY_SIZE.",
    )
    warmup_any_size: bool = Field(
        False,
        description="With compile, also warm up one size outside IMAGESMITH_WARMUP_SIZES: that compiles the graphs "
        "every other size shares, so requests at other sizes run compiled (with guidance_scale <= 1 they still "
        "run uncompiled). Lengthens the first start by those compiles (the base UNet's: ~2.4x its static graph's, "
        "318 s on an H100, with channels-last weights, on with compile), and those sizes' UNet calls run ~26 % "
        "slower than a warmed one's (uncompiled: ~75 %), with CUDA graphs (reduce-overhead): without them that graph is "
        "host-bound, no faster than uncompiled (runs 89-90). On by itself with IMAGESMITH_COMPILE_DYNAMIC (its "
        "graphs, compiled at a square size, fit no oblong one); two or more warm-up sizes no longer turn it on.",
    )
    compile_on_request: bool = Field(
        False,
        description="With compile and warm-up: a request of a shape the warm-up did not compile (another size, "
        "guidance_scale <= 1) compiles it, over 4 minutes on an H100 (projected 10-15) that every queued request "
        "waits for, and runs fast after. Off: it runs uncompiled (slower, eager speed), and nothing compiles on a request.",
    )

    # Pexels stock photos (sources/stock.py). Without a key the stock source reports itself unconfigured.
    pexels_api_key: SecretStr | None = Field(
        None, description="Pexels API key (https://www.pexels.com/api/); kept secret, never logged."
    )
    pexels_api_base_url: str = Field(DEFAULT_PEXELS_API_BASE_URL, description="Pexels API v1 root.")
    pexels_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["images.pexels.com"],
        description="Hosts photos may be downloaded from, comma-separated. A bare host means https only; "
        "'http://host:port' also allows plain http to that origin (for a local stand-in). A port needs the "
        "scheme ('https://host:8443'); an empty list is refused at start (it would refuse every download).",
    )
    pexels_max_download_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest photo download accepted, in bytes."
    )
    pexels_max_image_pixels: int = Field(
        100_000_000,
        ge=1,
        # Pillow refuses larger images in Image.open, before imagesmith's check could let them through.
        le=PILLOW_PIXEL_LIMIT,
        description="Largest photo accepted, in pixels (width x height, read from the header before decoding). "
        "A pixel costs 5 to 10 bytes to decode and fit, by mode, so memory is bounded by pexels_max_image_bytes.",
    )
    pexels_max_image_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Largest photo accepted, in the bytes its pixels take to decode and fit (width x height "
        "x: 5 for RGB or grey, palette or 1-bit; 8 for CMYK or grey with alpha; 9 for RGBA; 10 for 16-bit grey: "
        "the decoded image and the copies fitting makes, as measured), checked before decoding: a "
        "decompression-bomb guard. 256 MiB passes a whole Pexels original (up to about 50 MP RGB, 250 MB) and "
        "refuses a 10000x10000 RGBA PNG (900 MB; 1.2 GB measured at its peak), which the pixel cap passes and "
        "can be under 1 MB.",
    )
    pexels_timeout_s: float = Field(10.0, gt=0, description="Per-request timeout of API calls, in seconds.")
    pexels_download_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one photo download attempt, in seconds."
    )
    pexels_max_retries: int = Field(
        2, ge=0, le=10, description="Retries after a 5xx or network error (API calls and downloads)."
    )
    pexels_retry_backoff_s: float = Field(
        0.5, ge=0, description="First retry delay; doubles each retry, with jitter, up to 8 seconds."
    )
    pexels_quota_backoff_s: float = Field(
        900.0, gt=0, description="How long to stop calling after a 429 when no reset time is known."
    )
    pexels_cache_ttl_s: float = Field(
        86_400.0, ge=0, description="How long search results are reused (in memory); 0 turns the cache off."
    )
    pexels_per_page: int = Field(30, ge=1, le=80, description="Photos fetched per search to pick from.")
    pexels_locale: str = Field("", description="Search locale, e.g. 'en-US' or 'de-DE'; empty for Pexels'.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """Refused with the settings, at start: 'gpu' came out as an exit 1 from deep in the engine's start (a
        traceback in a server's log, the server left running)."""
        name = value.strip().lower()
        if not DEVICE_NAME.fullmatch(name):
            raise ValueError("device must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")
        return name

    @field_validator("base_model", "refiner_model", "vae_model")
    @classmethod
    def _names_a_file_system_takes(cls, value: str) -> str:
        """A folder named past a file system's 255-byte names was a traceback from the first place that looked
        at it (`Path.exists` raises for such a name), at start or mid-command, naming no setting."""
        for name in Path(value).parts:
            if len(name.encode()) > MAX_NAME_BYTES:
                raise ValueError(
                    f"a name in this path ({name[:20]}...) is {len(name.encode())} bytes, more than the "
                    f"{MAX_NAME_BYTES} a file system takes; check the path"
                )
        return value

    @field_validator("pexels_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return comma_list(value)
        return value

    @field_validator("pexels_allowed_hosts")
    @classmethod
    def _hosts_parse(cls, value: list[str]) -> list[str]:
        # Checked at start-up: a host with a port and no scheme, or an empty list, refused every download later.
        from imagesmith.sources.allowed_hosts import parse_allowed_hosts  # here: config imports no sources

        parse_allowed_hosts(value)
        return value

    @field_validator("pexels_locale")
    @classmethod
    def _locale_shape(cls, value: str) -> str:
        # Empty: Pexels' own default. Anything else was sent as typed ("german"), and Pexels ignored it.
        from imagesmith.sources.pexels_locale import checked_locale

        locale = value.strip()
        return locale and checked_locale(locale)

    @field_validator("pexels_api_base_url")
    @classmethod
    def _base_url_parse(cls, value: str) -> str:
        # Checked at start-up: 'notaurl' failed each search as a Pexels request that cannot be sent (exit 3).
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL such as {DEFAULT_PEXELS_API_BASE_URL}")
        return value.strip()

    @field_validator("pexels_api_key", "compile_cache_dir", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        # An empty value in a .env file means the setting's None: IMAGESMITH_PEXELS_API_KEY= is "not
        # configured", not "the key ''"; IMAGESMITH_COMPILE_CACHE_DIR= is its default, not the current folder.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("warmup_sizes", "stock_default_size")
    @classmethod
    def _sizes_parse(cls, value: str) -> str:
        # Checked here, at start-up, by the same rules as a request's size, so a typo or an odd size is a
        # clear error now rather than a failed warm-up or a refused request later.
        for part in comma_list(value):
            width, height = parse_size(part)
            check_side("width", width)
            check_side("height", height)
        return value

    @field_validator("warmup_sizes")
    @classmethod
    def _warmup_sizes_not_empty(cls, value: str, info: ValidationInfo) -> str:
        # Empty, a compiled server would warm up nothing, then (compiling nothing on a request) run every pass
        # uncompiled while its levers said torch.compile. Without a warm-up the list is not read.
        if info.data.get("warmup", True) and not comma_list(value):
            raise ValueError(
                "IMAGESMITH_WARMUP_SIZES lists no size: give at least one WxH (the default is 1024x1024), "
                "or set IMAGESMITH_WARMUP=false to skip the warm-up"
            )
        return value

    @field_validator("cudnn_benchmark")
    @classmethod
    def _cudnn_benchmark_not_with_cuda_graphs(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        # cuDNN times a new shape's algorithms by running and synchronising, which a CUDA-graph capture
        # forbids: on an H200 the capture failed (run 27) and, in the engine's eager fallback, the process
        # crashed (segmentation fault, run 32); with graphs it was also slower (1.464 s vs 1.385 s, run 31).
        compile_mode = info.data.get("compile")
        if value and compile_mode in CUDA_GRAPH_MODES:
            raise ValueError(
                f"cuDNN benchmarking cannot be combined with {ENV_PREFIX}COMPILE={compile_mode} (a CUDA-graph "
                f"mode: timing a convolution inside a graph capture fails it); unset {ENV_PREFIX}CUDNN_BENCHMARK "
                f"or use {ENV_PREFIX}COMPILE=default"
            )
        return value

    @field_validator("compile_regions")
    @classmethod
    def _compile_regions_not_with_dynamic(cls, value: bool, info: ValidationInfo) -> bool:
        # Compiled with every size symbolic, torch 2.13 cannot reuse a region: the first compile fails inside
        # dynamo (seen on the tiny UNet), and the engine would serve eager for good.
        if value and info.data.get("compile_dynamic"):
            raise ValueError(
                f"{ENV_PREFIX}COMPILE_REGIONS=true cannot be combined with {ENV_PREFIX}COMPILE_DYNAMIC=true (torch "
                f"cannot reuse a compiled region when every size is symbolic); unset one of them"
            )
        return value

    @field_validator("fp8_convs", "fp8_fused_geglu")
    @classmethod
    def _fp8_extras_need_static_fp8(cls, value: bool, info: ValidationInfo) -> bool:
        # Both take scales calibrated with the fp8 linears' (engine/fp8_conv.py, engine/fp8_geglu.py): per-call
        # scales would put a reduction before every convolution, the cost that made dynamic fp8 slow (run 48),
        # and the fused GEGLU kernel writes e4m3 with the next linear's fixed scale.
        name = f"{ENV_PREFIX}{str(info.field_name).upper()}"
        if value and not (info.data.get("fp8") and info.data.get("fp8_scales") is Fp8Scales.STATIC):
            raise ValueError(
                f"{name}=true needs fp8 linears with static scales: set {ENV_PREFIX}FP8=true "
                f"(and leave {ENV_PREFIX}FP8_SCALES=static), or unset {name}"
            )
        return value

    @field_validator("default_width", "default_height")
    @classmethod
    def _side_valid(cls, value: int) -> int:
        return check_side("the size", value)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir_not_blank(cls, value: object) -> object:
        # Path("") is ".": an empty IMAGESMITH_DATA_DIR= put the job store, images and models in whatever folder
        # the process started from, so a server started elsewhere found another, empty queue.
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                f"is empty, which would put the data in whatever folder imagesmith starts from; unset it for the "
                f"default ({default_data_dir()}), or give a folder"
            )
        return value

    @field_validator("max_total_pixels")
    @classmethod
    def _default_sizes_fit(cls, value: int, info: ValidationInfo) -> int:
        """A request that gives no size gets the default size (or, where Pexels may serve it, the stock default
        size): one image of it must fit, or every such request is refused, and an OpenAI client, which may only
        send the server's default ("auto") or SDXL's sizes, could not make one request."""
        sizes = {
            f"{ENV_PREFIX}DEFAULT_WIDTH x {ENV_PREFIX}DEFAULT_HEIGHT": (
                info.data.get("default_width"),
                info.data.get("default_height"),
            )
        }
        stock = info.data.get("stock_default_size")
        if isinstance(stock, str) and stock.strip():
            sizes[f"{ENV_PREFIX}STOCK_DEFAULT_SIZE"] = parse_size(stock)
        for name, (width, height) in sizes.items():
            if isinstance(width, int) and isinstance(height, int) and width * height > value:
                raise ValueError(
                    f"{value} pixels is less than one image of {name} ({width}x{height} = {width * height}), "
                    "so every request without a size would be refused; raise it, or lower that size"
                )
        return value

    def warmup_size_list(self) -> list[tuple[int, int]]:
        return [parse_size(part) for part in comma_list(self.warmup_sizes)]

    def warms_up_any_size(self) -> bool:
        """Whether the warm-up also compiles the graphs shared by sizes outside the warm-up sizes: asked for, or
        IMAGESMITH_COMPILE_DYNAMIC (its UNet graphs, compiled at a square size, guard height == width: without a
        pass at an oblong size every oblong request would run uncompiled).

        Not implied by two or more warm-up sizes any more (it was until session 36, to keep what their warm-up
        did before engine/size_routing.py). Run 87 measured the price on an H100: the base UNet's shared graph
        compiled in 453 s against its static graph's 133 s, and a call on it costs +29 % (run 88, with the
        channels-last weights, on by default with compile since run 90: 318 s and +26 %). A service that lists
        its sizes gets each a static graph; compiling the shared ones too would more than double its start-up
        for sizes it did not list, which run uncompiled instead (~1.75x a warmed size's time)."""
        return self.warmup_any_size or self.compile_dynamic

    def stock_size(self) -> tuple[int, int]:
        """The size of a request Pexels may serve that gives none: stock_default_size, or when that is empty
        default_width x default_height. The API and `imagesmith search` both use it."""
        if self.stock_default_size.strip():
            return parse_size(self.stock_default_size)
        return self.default_width, self.default_height

    def with_changes(self, **changes: object) -> Settings:
        """A copy with some settings changed, validated as the environment's values are (model_copy would
        keep raw strings where enums belong)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def tiny_model_dir(self) -> Path:
        return self.data_dir / "tiny-model"

    def api_key_list(self) -> list[str]:
        return comma_list(self.api_keys)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def settings_file() -> Path:
    """The settings file Settings reads (its env_file: .env in the current folder)."""
    return Path(str(Settings.model_config.get("env_file")))


def env_file_problem(env_file: Path | None = None) -> str | None:
    """Why the settings file (Settings' env_file unless given) cannot be read, or None. python-dotenv reads it as
    UTF-8 and a file saved in another encoding (Windows Notepad's UTF-16) came out as its UnicodeDecodeError's
    traceback, naming no file."""
    env_file = env_file or settings_file()
    try:
        text = env_file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as error:
        return (
            f"{env_file.resolve()} (the settings file) is not UTF-8 text ({error.reason} at byte {error.start}): "
            "save it as UTF-8, or move it away"
        )
    except OSError as error:
        return f"{env_file.resolve()} (the settings file) cannot be read: {error.strerror}"
    return _unparsed_env_line(env_file, text)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _unparsed_env_line(env_file: Path, text: str) -> str | None:
    """The first line python-dotenv cannot read as NAME=value, or None. It skips such a line with a warning that
    names no setting, and the setting on it (a key with its quote left open, say) silently stayed unset. Only
    the name is said, never the value: the line may hold a secret."""
    import io

    from dotenv.parser import parse_stream  # pydantic-settings reads the file with python-dotenv

    bad = [binding.original for binding in parse_stream(io.StringIO(text)) if binding.error]
    if not bad:
        return None
    first = bad[0]
    # The name only when the line starts as NAME= would: anything else before an "=" may hold part of a value
    # (a key's base64 padding is an "=" of its own).
    name = first.string.strip().removeprefix("export ").split("=", 1)[0].strip()
    said = f" ({name})" if "=" in first.string and _ENV_NAME.fullmatch(name) else ""
    where = f"line {first.line}{said}"
    more = f", and {len(bad) - 1} more line(s) after it," if len(bad) > 1 else ""
    return (
        f"{env_file.resolve()} (the settings file): {where}{more} cannot be read as NAME=value "
        "(a quote left open?): fix it or remove it; it would be ignored"
    )


def unknown_setting_lines(
    environ: Mapping[str, str] | None = None, env_file: Path | None = None
) -> list[str]:
    """A warning for each IMAGESMITH_ name, in the environment or the settings file, that is no setting: a typo
    (IMAGESMITH_MODLE=tiny) was ignored without a word, and the server ran as if it had not been set. The
    nearest real name is offered. Names only, never values (a value may be a secret)."""
    import difflib

    from dotenv import dotenv_values

    known = [name.upper() for name in Settings.model_fields]  # compared without the prefix, which all share
    env_file = env_file or settings_file()
    places = {"the environment": list((os.environ if environ is None else environ).keys())}
    if env_file.is_file():
        places[f"{env_file} (the settings file)"] = [name for name in dotenv_values(env_file) if name]
    lines = []
    for place, names in places.items():
        for name in names:
            upper = name.upper()  # settings are read case-insensitively
            if (
                not upper.startswith(ENV_PREFIX)
                or upper.removeprefix(ENV_PREFIX).lower() in Settings.model_fields
            ):
                continue
            nearest = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), known, n=1, cutoff=0.7)
            hint = (
                f"; did you mean {ENV_PREFIX}{nearest[0]}?"
                if nearest
                else "; the settings are listed in the README"
            )
            lines.append(f"{name} (in {place}) is not a setting, so it is ignored{hint}")
    return lines


def settings_error_lines(error: ValidationError) -> list[str]:
    """A refused setting, named as the user set it: 'IMAGESMITH_PRECISION: Input should be ...'."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        lines.append(setting_error_line(item, f"{ENV_PREFIX}{field.upper()}" if field else "settings"))
    return lines


def setting_error_line(item: Mapping[str, Any], name: str) -> str:
    """One refused setting (a pydantic error item) under `name`, the way the user set it: an environment
    variable, or a command's option."""
    return f"{name}: {str(item['msg']).removeprefix('Value error, ')} (got {item.get('input')!r})"
