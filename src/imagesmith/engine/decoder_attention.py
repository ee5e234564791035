"""The VAE decoder's one attention as two matmuls and a softmax (IMAGESMITH_DECODER_MATH_ATTENTION).

Why: the SDXL VAE's mid-block attends over every latent position with one head 512 wide (16,384 positions at
1024x1024). No flash kernel takes head dimension 512, so torch runs it in the memory-efficient kernel, 4.5 ms of
a ~39 ms compiled decode on an H100. Traced under torch's math path instead, inductor compiles it to cuBLAS
matmuls and a fused softmax; with bf16 operands and fp32 accumulation (`allow_fp16_bf16_reduction_math_sdp`)
the decode took 36.0 ms against 38.8 (run 80 in docs/benchmarks.md, H100, same process), the image within bf16
rounding of the kernel's (relative L2 1.2e-2, 51.5 dB, the size of any reordering of the sums). The score matrix
is 0.5 GiB in bf16 at 1024x1024, yet the compiled decode's peak did not grow (1.45 GiB either way).

Only with the decoder compiled (eager, the math path would write that matrix and read it back through separate
kernels), and up to 128x128 latents (MAX_POSITIONS: the matrix grows with the positions squared, 8 GiB at
2048x2048). Opt-in: each image size then keeps a static decoder graph of its own (engine/fast.py), traced under
the path chosen for that size; left to dynamo, the second size would trace one dynamic graph for every size to
come under whichever path that size had. So a server that sees many sizes compiles the decoder once for each,
and past dynamo's graph limit (64) serves eager: the lever is for servers with few sizes. Routing by size inside
the traced code (a branch dynamo guards on) would lift that; not built. Torch records the attention path when
it traces, so the choice is in force around every decode (the warm-up's included), and the compile cache is
keyed by it (engine/fast.py, compile_cache_for): a cache traced with the kernel would otherwise hand its graph to
a start that asked for the matmuls, as run 80's first try showed (every variant got the first one's kernels).
Switching it on or off therefore starts with an empty compile cache: one cold compile, UNets included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Latent positions up to which the decode's attention runs as matmuls: 128x128, a 1024x1024 image, where it was
# measured. The math path holds the whole score matrix, positions squared: 0.5 GiB in bf16 here, but 8 GiB at
# 2048x2048, where the memory-efficient kernel needs none; larger decodes keep the kernel.
MAX_POSITIONS = 128 * 128
_MARK = "_imagesmith_math_attention"


def mark_math_attention(decoder: Any, on: bool) -> None:
    """Record on the decoder, as it is compiled, whether its attention is to be traced as matmuls: what the
    engine reads at each decode, so the choice follows the compile that made the graphs (and their cache)."""
    setattr(decoder, _MARK, on)


def math_attention_for(decoder: Any, latents: torch.Tensor) -> bool:
    """Whether this decode runs its attention as matmuls: the decoder was compiled for it and still runs
    compiled (not after a failed compile's fall back to eager, where the math path is the slow one), and the
    latents are no larger than MAX_POSITIONS."""
    compiled = getattr(decoder, "_compiled_call_impl", None) is not None
    positions = latents.shape[-1] * latents.shape[-2]
    return bool(getattr(decoder, _MARK, False)) and compiled and positions <= MAX_POSITIONS


@contextmanager
def decoder_attention(math: bool) -> Iterator[None]:
    """With `math`, the body's scaled_dot_product_attention runs torch's math path with bf16/fp16 reductions
    allowed (fp32 accumulation in the matmuls); the process-wide flag is restored on exit. Without, nothing."""
    if not math:
        yield
        return
    reduced = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(reduced)
