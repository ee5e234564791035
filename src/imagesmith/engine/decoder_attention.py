"""The VAE decoder's one attention as two matmuls and a softmax (IMAGESMITH_DECODER_MATH_ATTENTION).

Why: the SDXL VAE's mid-block attends over every latent position with one head 512 wide (16,384 positions at
1024x1024). No flash kernel takes head dimension 512, so torch runs it in the memory-efficient kernel, 4.5 ms of
a ~39 ms compiled decode on an H100. Traced under torch's math path instead, inductor compiles it to cuBLAS
matmuls and a fused softmax; with bf16 operands and fp32 accumulation (`allow_fp16_bf16_reduction_math_sdp`)
the decode took 36.0 ms against 38.8 (run 80 in docs/benchmarks.md, H100, same process), the image within bf16
rounding of the kernel's (relative L2 1.2e-2, 51.5 dB, the size of any reordering of the sums). The score matrix
is 0.5 GiB in bf16 at 1024x1024, yet the compiled decode's peak did not grow (1.45 GiB either way).

Only with the decoder compiled: eager, the math path would write that matrix and read it back through separate
kernels. Torch records the attention path when it traces, so the choice is in force around every decode (the
warm-up's included), and the compile cache is keyed by it (engine/fast.py, compile_cache_for): a cache traced
with the kernel would otherwise hand its graph to a start that asked for the matmuls, as run 80's first try
showed (every variant got the first one's kernels).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


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
