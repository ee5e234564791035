"""A GPU kernel's kind, from its name, for the benchmarks' profiles: Triton (inductor's fused pointwise and
norms), layout transpose, attention, convolution, matmul, other.

The order matters, because names overlap: inductor names its kernels after the ops they fuse
("triton_..._convolution_..." adds a convolution's bias), cuDNN's attention kernels say "fprop" like its
convolutions ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_..."), and its convolutions say "gemm"
("sm90_xmma_fprop_implicit_gemm_..."). cuBLAS's Hopper matmuls are "nvjet_sm90_tst_..." and say neither; run 72
counted them as convolutions when "sm90_" and "xmma" were convolution words. Under max_autotune inductor's own
matmul templates are Triton kernels too ("triton_tem_fused_addmm_..."), with the pointwise work they fuse in
their names: they count as matmuls, ahead of the other Triton kernels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

KINDS = (
    ("matmul", ("triton_tem_",)),
    ("triton (inductor)", ("triton",)),
    ("layout transpose", ("nchwtonhwc", "nhwctonchw", "transpose", "converttensor")),
    ("attention", ("fmha", "flash", "attention", "sdpa", "attn", "softmax")),
    ("convolution", ("conv", "fprop", "implicit", "dgrad", "winograd", "fft")),
    ("matmul", ("gemm", "nvjet", "cublas", "cutlass", "matmul", "xmma")),
)


def kind_of(kernel: str) -> str:
    """The kind of the kernel named `kernel`, the first in KINDS whose words its name contains.

    >>> kind_of("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT")
    'matmul'
    >>> kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc")
    'convolution'
    >>> kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7")
    'attention'
    >>> kind_of("triton_poi_fused_convolution_0")
    'triton (inductor)'
    >>> kind_of("triton_tem_fused_addmm_gelu_mul_7")
    'matmul'
    """
    lowered = kernel.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def memsets_by_operator(events: Iterable[Any]) -> dict[str, int]:
    """How many memsets a profile's operators queued, by the innermost `aten::` operator (with its input shapes)
    that holds them, most first; memsets the device ran that no host event holds count under "(not linked)".

    `events` are a torch profiler's events (`prof.events()`). The profiler hangs each device kernel or memset
    (`kernels`, by name) on the host event it was queued in, usually the operator itself; a host event that is
    not an `aten::` operator (a runtime call, an inductor kernel's record) counts under the nearest `aten::`
    operator above it (`cpu_parent`), else under its outermost ancestor."""
    counts: dict[str, int] = {}
    on_device = 0
    for event in events:
        if "CUDA" in str(getattr(event, "device_type", "")):
            on_device += "memset" in event.name.lower()
            continue
        queued = sum("memset" in kernel.name.lower() for kernel in event.kernels)
        if not queued:
            continue
        owner = event
        while owner.cpu_parent is not None and not owner.name.startswith("aten::"):
            owner = owner.cpu_parent
        key = f"{owner.name} {owner.input_shapes}"[:160]
        counts[key] = counts.get(key, 0) + queued
    unlinked = on_device - sum(counts.values())
    if unlinked > 0:
        counts["(not linked)"] = unlinked
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
