"""The hardware plan: device, dtype, offload and VAE handling, chosen once from the GPU's properties.

`plan_hardware` is a pure function of a DeviceInfo and the settings, so every branch is tested with faked
devices; `probe_device` is the only part that asks torch.

Memory budget of SDXL base + refiner in 16-bit weights (parameter counts of the public checkpoints):
base UNet 2.57e9 -> 5.1 GB, refiner UNet 2.26e9 -> 4.5 GB, OpenCLIP-bigG text encoder 0.69e9 -> 1.4 GB,
CLIP-L 0.12e9 -> 0.25 GB, VAE 0.08e9 -> 0.17 GB: about 11.4 GB resident, shared text_encoder_2 and VAE counted
once. A 1024x1024 denoising step with guidance adds about 2-3 GB of activations and the VAE decode about 3 GB.
Measured on an H200 at 1024x1024, bf16, 40-step ensemble (docs/benchmarks.md): peak 13.3 GiB with everything
resident, 5.6 GiB with model offload, 2.4 GiB with sequential offload. Hence the thresholds on *free* memory:

- >= 16 GiB free: no offload. Peak 13.3 GiB plus headroom for larger aspect presets, batches and the
  allocator's fragmentation. A 24 GB RTX 4090 (about 22.5 GiB free) runs everything resident.
- >= 12 GiB free with fp8 on (IMAGESMITH_FP8=true on a card with fp8 tensor cores): no offload. The eager fp8
  ensemble peaks at 9.9 GiB (run 47), and 12 keeps bf16's ratio of threshold to peak (16 / 13.3 = 1.2). So a
  16 GB RTX 4080 (about 15.1 GiB free) runs fp8 resident rather than on model offload's ~4 s of copies.
- >= 9 GiB free: model CPU offload. Only the running component is on the GPU (peak 5.6-6.8 GiB measured):
  fits a 12 GB card (about 11 GiB free) and 10-16 GB cards. Costs about 4 s per image on an H200 host
  (each UNet is copied in at about 5 GB/s per stage, and back out).
- below: sequential offload, layer by layer (peak 2.4 GiB, so a 6 GB card runs it, slowly: weights stream over
  PCIe every step, about 40 s per 40-step image on an H200 host), with VAE tiling so the decode stays small.

Offload exists for CUDA cards only; on the CPU or MPS an offload setting is ignored (and says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from imagesmith.config import (
    AttentionBackendChoice,
    CompileChoice,
    Fp8Scales,
    OffloadChoice,
    PrecisionChoice,
    Settings,
    VaeTilingChoice,
)
from imagesmith.engine.cpu_threads import choose_cpu_threads, cpu_budget

log = logging.getLogger(__name__)

GIB = 1024**3
NO_OFFLOAD_MIN_FREE_GIB = 16.0
FP8_NO_OFFLOAD_MIN_FREE_GIB = 12.0
MODEL_OFFLOAD_MIN_FREE_GIB = 9.0
FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada and Hopper
# Images above this many pixels decode in tiles once memory is tight (offloading plans).
TILING_PIXELS = 1024 * 1024

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class DeviceInfo:
    """What the plan needs to know about a device; faked in tests."""

    kind: str  # "cuda", "mps" or "cpu"
    index: int = 0
    name: str = "cpu"
    capability: tuple[int, int] | None = None
    total_memory_gib: float = 0.0
    free_memory_gib: float = 0.0

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind


@dataclass(frozen=True)
class HardwarePlan:
    device: str
    dtype_name: str  # "bf16", "fp16" or "fp32": weights and compute
    vae_dtype_name: str  # the VAE may decode in fp32 where fp16 would overflow
    offload: str  # "none", "model" or "sequential"
    # When the VAE decodes in tiles: "always", "never", or "large" (large images while weights are offloaded).
    vae_tiling: str
    reasons: tuple[str, ...]
    # "static", "row-wise" or "per-tensor" scales for fp8 linears (engine/fp8.py); None: off.
    fp8: str | None = None
    fp8_asked: bool = False  # the settings asked for fp8 (fp8 may still be None: skipped, with a reason)
    attention: str = "auto"  # the attention kernel tried first (engine/attention.py); "auto": torch's order
    fp8_convs: bool = False  # the UNets' convolutions in fp8 through cuDNN (engine/fp8_conv.py)
    fp8_fused_geglu: bool = False  # GEGLU inside the feed-forward's first fp8 matmul (engine/fp8_geglu.py)
    fused_geglu: bool = False  # GEGLU inside the feed-forward's first bf16 matmul (engine/bf16_geglu.py)
    cpu_threads: int = 0  # torch's intra-op threads for the engine (engine/cpu_threads.py); 0: torch's own

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    @property
    def vae_dtype(self) -> torch.dtype:
        return _DTYPES[self.vae_dtype_name]

    def summary(self) -> str:
        return (
            f"device={self.device} dtype={self.dtype_name} vae={self.vae_dtype_name} offload={self.offload} "
            f"vae_tiling={self.vae_tiling} "
            f"({'; '.join(self.reasons)})"
        )


DEVICE_SETTING = "IMAGESMITH_DEVICE"


def _set_device(setting: str, value: str) -> str:
    """The fix for a device that cannot be used, said the way the user set it: `serve --device` gets
    "use --device cpu", the environment "set IMAGESMITH_DEVICE=cpu"."""
    return f"use {setting} {value}" if setting.startswith("--") else f"set {setting}={value}"


def _cuda_index(requested: str, setting: str = DEVICE_SETTING) -> int:
    """'cuda' -> the current GPU, 'cuda:N' -> N, checked against the GPUs torch sees (torch itself answers a
    wrong index with a bare assertion)."""
    if ":" not in requested:
        return torch.cuda.current_device()
    text = requested.split(":", 1)[1]
    count = torch.cuda.device_count()
    if not text.isdigit():
        raise ValueError(f"device must be 'cuda' or 'cuda:N' with N a GPU number, got '{requested}'")
    if int(text) >= count:
        raise RuntimeError(
            f"device '{requested}' was asked for but torch sees {count} GPU(s), numbered from 0; "
            f"set {setting} to one of them"
        )
    return int(text)


def probe_device(requested: str = "auto", setting: str = DEVICE_SETTING) -> DeviceInfo:
    """Ask torch what the requested device is. 'auto' takes the first CUDA GPU, else the CPU. `setting`: how
    the user gave the device (an environment variable, or a command's option), which the fixes name."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device '{requested}' was asked for but torch sees no CUDA GPU "
                f"(torch {torch.__version__}); {_set_device(setting, 'cpu')} or install a CUDA build of torch"
            )
        index = _cuda_index(requested, setting)
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        return DeviceInfo(
            kind="cuda",
            index=index,
            name=props.name,
            capability=(props.major, props.minor),
            total_memory_gib=total / GIB,
            free_memory_gib=free / GIB,
        )
    if requested == "mps":
        # Checked as CUDA is: unchecked, doctor printed the device as fine and then a traceback, and a
        # generation failed with "PyTorch is not linked with support for mps devices" and no fix.
        if not torch.backends.mps.is_available():
            built = "not built into" if not torch.backends.mps.is_built() else "not usable with"
            raise RuntimeError(
                f"device 'mps' was asked for but Apple MPS is {built} this torch ({torch.__version__}) "
                f"on this machine; {_set_device(setting, 'cpu')} (or auto)"
            )
        return DeviceInfo(kind="mps", name="Apple MPS")
    if requested == "cpu":
        return DeviceInfo(kind="cpu", name="cpu")
    raise ValueError(f"device must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got '{requested}'")


def _choose_precision(device: DeviceInfo, settings: Settings, reasons: list[str]) -> tuple[str, str]:
    vae_safe_in_fp16 = (
        settings.vae_fp16_safe if settings.vae_fp16_safe is not None else bool(settings.vae_model)
    )
    if settings.precision is not PrecisionChoice.AUTO:
        dtype = settings.precision.value
        reasons.append(f"precision {dtype} from settings")
    elif device.kind == "cuda" and device.capability and device.capability >= (8, 0):
        dtype = "bf16"
        reasons.append(f"bf16: compute capability {device.capability[0]}.{device.capability[1]} >= 8.0")
    elif device.kind in ("cuda", "mps"):
        dtype = "fp16"
        reasons.append("fp16: no fast bf16 on this device")
    else:
        dtype = "fp32"
        reasons.append("fp32: CPU")
    # bf16 has fp32's exponent range, so the SDXL VAE cannot overflow in it; fp16 can (NaN/black images)
    # unless the VAE is a fixed one.
    if dtype == "fp16" and not vae_safe_in_fp16:
        reasons.append("VAE decodes in fp32: the stock SDXL VAE overflows in fp16")
        return dtype, "fp32"
    return dtype, dtype


def _choose_offload(device: DeviceInfo, settings: Settings, reasons: list[str]) -> str:
    if device.kind != "cuda":
        if settings.offload not in (OffloadChoice.AUTO, OffloadChoice.NONE):
            reasons.append(f"offload {settings.offload.value} ignored: {device.kind} has no separate memory")
        return "none"
    if settings.offload is not OffloadChoice.AUTO:
        reasons.append(f"offload {settings.offload.value} from settings")
        return settings.offload.value
    free = device.free_memory_gib
    # fp8 weights take 3.3 GiB less, so resident needs less free memory, where fp8 will be applied: it needs
    # resident weights and fp8 tensor cores (_choose_fp8 refuses older cards outright).
    fp8_resident = settings.fp8 and (device.capability or (0, 0)) >= FP8_MIN_CAPABILITY
    resident_min = FP8_NO_OFFLOAD_MIN_FREE_GIB if fp8_resident else NO_OFFLOAD_MIN_FREE_GIB
    weights = " with fp8 weights" if fp8_resident else ""
    if free >= resident_min:
        reasons.append(f"no offload: {free:.1f} GiB free >= {resident_min:.0f}{weights}")
        return "none"
    if free >= MODEL_OFFLOAD_MIN_FREE_GIB:
        reasons.append(f"model offload: {free:.1f} GiB free < {resident_min:.0f}{weights}")
        return "model"
    reasons.append(f"sequential offload: {free:.1f} GiB free < {MODEL_OFFLOAD_MIN_FREE_GIB:.0f}")
    return "sequential"


def _choose_fp8(device: DeviceInfo, settings: Settings, offload: str, reasons: list[str]) -> str | None:
    """fp8 linears need resident weights and, on a GPU, fp8 tensor cores; dynamic row-wise scales need Hopper."""
    if not settings.fp8:
        return None
    if offload != "none":
        # Offloaded weights live on the meta device between uses; there is nothing to quantize there.
        reasons.append(f"fp8 skipped: it needs offload=none (offload {offload})")
        return None
    static = settings.fp8_scales is Fp8Scales.STATIC
    if device.kind != "cuda":
        scaling = "static" if static else "row-wise"
        reasons.append(f"fp8 {scaling} emulated in fp32 off the GPU: lossy and slower, useful for tests only")
        return scaling
    capability = device.capability or (0, 0)
    if capability < FP8_MIN_CAPABILITY:
        raise RuntimeError(
            "IMAGESMITH_FP8=true needs a GPU with fp8 tensor cores (compute capability 8.9+), "
            f"this one is {capability[0]}.{capability[1]}"
        )
    if static:
        scaling = "static"  # one scale per tensor, which every fp8 card multiplies
    else:
        scaling = "row-wise" if capability >= (9, 0) else "per-tensor"
    reasons.append(f"fp8 {scaling}: compute capability {capability[0]}.{capability[1]}")
    if settings.compile is CompileChoice.OFF:
        # Eager, each fp8 linear launches its quantization's kernels next to the matmul, and a batch-1 UNet
        # call is launch-bound: run 47 (H200) took 3.63 s for the ensemble against eager bf16's 2.08 s. Compiled,
        # the quantization fuses away and fp8 is the fastest mode (1.21 s). Still allowed: it saves memory.
        reasons.append(
            "fp8 without torch.compile saves memory but is slower than bf16; set IMAGESMITH_COMPILE=reduce-overhead"
        )
    return scaling


def _choose_fp8_convs(device: DeviceInfo, settings: Settings, fp8: str | None, reasons: list[str]) -> bool:
    """fp8 convolutions ride on static fp8 (the settings require it); on a GPU they need cuDNN's fp8 kernels
    (Hopper) and NVIDIA's cuDNN frontend to reach them."""
    if not settings.fp8_convs:
        return False
    if fp8 != "static":  # fp8 itself was skipped (offload), with its reason
        reasons.append("fp8 convolutions skipped: they need the fp8 linears")
        return False
    if device.kind != "cuda":
        reasons.append(
            "fp8 convolutions emulated in fp32 off the GPU: lossy and slower, useful for tests only"
        )
        return True
    capability = device.capability or (0, 0)
    if capability < (9, 0):
        raise RuntimeError(
            "IMAGESMITH_FP8_CONVS=true needs cuDNN's fp8 convolutions, which need a Hopper GPU or newer (compute "
            f"capability 9.0+), this one is {capability[0]}.{capability[1]}; unset IMAGESMITH_FP8_CONVS"
        )
    from imagesmith.engine.cudnn_graphs import cudnn_frontend_available

    if not cudnn_frontend_available():
        raise RuntimeError(
            "IMAGESMITH_FP8_CONVS=true needs NVIDIA's cuDNN frontend: pip install 'imagesmith[fp8-convs]' "
            "(nvidia-cudnn-frontend), or unset IMAGESMITH_FP8_CONVS"
        )
    reasons.append("fp8 convolutions through cuDNN")
    return True


def _choose_fp8_fused_geglu(
    device: DeviceInfo, settings: Settings, fp8: str | None, reasons: list[str]
) -> bool:
    """The fused GEGLU kernel rides on static fp8 (the settings require it); on a GPU it is a Triton kernel."""
    if not settings.fp8_fused_geglu:
        return False
    if fp8 != "static":  # fp8 itself was skipped (offload), with its reason
        reasons.append("fp8 fused GEGLU skipped: it needs the fp8 linears")
        return False
    if device.kind == "cuda":
        from imagesmith.engine.geglu_feed_forward import triton_available

        if not triton_available():
            raise RuntimeError(
                "IMAGESMITH_FP8_FUSED_GEGLU=true needs Triton, which torch's CUDA builds install with it: "
                "pip install triton, or unset IMAGESMITH_FP8_FUSED_GEGLU"
            )
        reasons.append("fp8 GEGLU fused into the feed-forward's matmul (Triton)")
    else:
        reasons.append("fp8 fused GEGLU emulated in fp32 off the GPU: useful for tests only")
    return True


def _choose_fused_geglu(
    device: DeviceInfo, settings: Settings, dtype: str, offload: str, fp8: str | None, reasons: list[str]
) -> bool:
    """The bf16 fused GEGLU kernel: a Triton kernel for bf16 weights on a CUDA GPU with TMA (9.0+).

    Unset, it is on where it was measured to gain (docs/benchmarks.md, run 98: -21 ms an ensemble image on an
    H100): compiled, on a Hopper GPU (9.x), weights resident, Triton installed; elsewhere off, with a reason
    only where the user could change something. Set true, it runs wherever it can and says why not elsewhere;
    without Triton on such a GPU that is an error naming the setting."""
    asked = settings.fused_geglu
    if asked is False:
        return False
    auto = asked is None
    if auto and (settings.compile is CompileChoice.OFF or offload != "none"):
        return False
    if fp8 is not None:
        if not auto:
            reasons.append(
                "bf16 fused GEGLU skipped: the feed-forwards are fp8 (IMAGESMITH_FP8_FUSED_GEGLU fuses those)"
            )
        return False
    if device.kind != "cuda" or dtype != "bf16":
        if not auto:
            reasons.append(
                f"bf16 fused GEGLU skipped: it needs a CUDA GPU in bf16 (plan: {device.kind}, {dtype})"
            )
        return False
    capability = device.capability or (0, 0)
    if capability < (9, 0):  # the kernel's tiles move by TMA, which Hopper brought
        if not auto:
            reasons.append(
                f"bf16 fused GEGLU skipped: it needs compute capability 9.0+ (this GPU: {capability})"
            )
        return False
    if auto and capability[0] != 9:
        reasons.append(
            f"bf16 fused GEGLU not chosen: measured on Hopper (9.x) only, this GPU is {capability[0]}."
            f"{capability[1]}; IMAGESMITH_FUSED_GEGLU=true tries it"
        )
        return False
    from imagesmith.engine.geglu_feed_forward import triton_available

    if not triton_available():
        if auto:
            reasons.append("bf16 fused GEGLU skipped: Triton is not installed (pip install triton)")
            return False
        raise RuntimeError(
            "IMAGESMITH_FUSED_GEGLU=true needs Triton, which torch's CUDA builds install with it: "
            "pip install triton, or unset IMAGESMITH_FUSED_GEGLU"
        )
    reasons.append("GEGLU fused into the feed-forward's bf16 matmul (Triton)")
    return True


def _choose_attention(device: DeviceInfo, settings: Settings, reasons: list[str]) -> str:
    """The backends differ on CUDA only; elsewhere torch has one attention path, so a choice is ignored."""
    choice = settings.attention_backend
    if choice is AttentionBackendChoice.AUTO:
        return "auto"
    if device.kind != "cuda":
        reasons.append(f"attention backend {choice.value} ignored: {device.kind} has one attention path")
        return "auto"
    reasons.append(f"attention: {choice.value} first, from settings")
    return choice.value


def plan_hardware(device: DeviceInfo, settings: Settings) -> HardwarePlan:
    reasons: list[str] = [
        f"{device.name}" + (f", {device.total_memory_gib:.0f} GiB" if device.total_memory_gib else "")
    ]
    dtype, vae_dtype = _choose_precision(device, settings, reasons)
    offload = _choose_offload(device, settings, reasons)
    if settings.vae_tiling is VaeTilingChoice.OFF:
        tiling = "never"
    elif settings.vae_tiling is VaeTilingChoice.ON or offload == "sequential":
        tiling = "always"
    else:
        tiling = "large"
    if offload == "sequential" and tiling == "always":
        reasons.append("VAE tiling: decode in tiles to stay small")
    fp8 = _choose_fp8(device, settings, offload, reasons)
    fp8_convs = _choose_fp8_convs(device, settings, fp8, reasons)
    fp8_fused_geglu = _choose_fp8_fused_geglu(device, settings, fp8, reasons)
    fused_geglu = _choose_fused_geglu(device, settings, dtype, offload, fp8, reasons)
    attention = _choose_attention(device, settings, reasons)
    cpu_threads = choose_cpu_threads(settings.cpu_threads, cpu_budget(), reasons)
    return HardwarePlan(
        device=device.torch_device,
        dtype_name=dtype,
        vae_dtype_name=vae_dtype,
        offload=offload,
        vae_tiling=tiling,
        reasons=tuple(reasons),
        fp8=fp8,
        fp8_asked=settings.fp8,
        attention=attention,
        fp8_convs=fp8_convs,
        fp8_fused_geglu=fp8_fused_geglu,
        fused_geglu=fused_geglu,
        cpu_threads=cpu_threads,
    )


def needs_tiling(plan: HardwarePlan, width: int, height: int) -> bool:
    """Tiling is on for the plan, or the image is large and weights are being offloaded (memory is tight),
    unless the settings turned tiling off."""
    if plan.vae_tiling == "large":
        return plan.offload != "none" and width * height > TILING_PIXELS
    return plan.vae_tiling == "always"
