"""The Triton kernel behind engine/bf16_geglu.py: the feed-forward's first bf16 matmul with GEGLU in its epilogue.

Why: in a compiled bf16 UNet, each transformer block's feed-forward starts with a cuBLAS matmul writing its
[M, 2N] product in bf16, then one inductor kernel reads that back to compute value x gelu(gate). In a base UNet
call at batch 2 that pass is 1.69 ms of 70 launches (run 91, H100). Here the gate and the value are computed side
by side in one tile and only the [M, N] result is written.

The weight's rows are interleaved (value row j, then gate row j: engine/bf16_geglu.py lays them out once), so one
dot of a BLOCK_M x 2*BLOCK_N tile holds both halves for BLOCK_N output columns, split in registers. Tiles move by
Hopper's tensor memory accelerator (TMA), as in engine/fp8_geglu_kernel.py: edges read as zeros and are clipped
on the store, so no masks.

Imported only where Triton is (a CUDA machine); engine/bf16_geglu.py keeps an fp32 reference for the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from imagesmith.engine.geglu_feed_forward import aligned_for_tma
from imagesmith.engine.tma_tiles import (
    gelu_exact,
    grouped_tile,
    output_tile_grid,
    tma_configs,
    tma_descriptor,
)

# Tiles for Hopper's bf16 tensor cores. BLOCK_N counts output columns: the weight tile is twice as tall, so
# 128 gives a 128 x 256 fp32 accumulator (wgmma's widest N), 128 registers a thread over 8 warps. Shared memory
# per stage: (128 + 256) x 64 x 2 bytes = 48 KiB, so 4 stages fit an H100's 227 KiB.
_TILES = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (128, 64, 64, 8, 5),
    (64, 128, 64, 4, 4),
]
# The autotuner picks among these. Run 100 timed each of them and six others alone at every SDXL shape: the best
# are here (128x128x64, 3 or 4 stages), and BLOCK_K 128 or 4-warp tiles were 8-30 % slower. A persistent launch
# of the same tiles (one program per SM, looping over tiles) was 7-9 % faster alone but gained nothing in the
# engine (run 101: 1.297 against 1.299 s an image), so it went; it is in git at 54c74dd.
_CONFIGS = tma_configs(_TILES, weight_rows_per_column=2)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _bf16_geglu_kernel(
    x_desc,  # [M, K] bf16
    w_desc,  # [2N, K] bf16: value row 0, gate row 0, value row 1, ...
    bias_ptr,  # [2N], interleaved the same way
    out_desc,  # [M, N] bf16
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    row, col = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    both = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        both = tl.dot(x_desc.load([row, k]), w_desc.load([2 * col, k]).T, both)

    if HAS_BIAS:
        cols = 2 * col + tl.arange(0, 2 * BLOCK_N)
        both += tl.load(bias_ptr + cols, mask=cols < 2 * N, other=0.0).to(tl.float32)[None, :]
    value, gate = tl.split(tl.reshape(both, (BLOCK_M, BLOCK_N, 2)))
    out_desc.store([row, col], (value * gelu_exact(gate)).to(out_desc.dtype))


def bf16_geglu_cuda(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: Any = None
) -> torch.Tensor:
    """x [M, K] bf16, weight [2N, K] bf16 interleaved, bias [2N] or None -> [M, N] bf16 (engine/bf16_geglu.py's
    op says what it computes). TMA reads rows 16-byte aligned: K and N multiples of 8 (bf16). `kernel`: this
    module's kernel (the default), or its jit function autotuned over other configs (benchmarks/
    bf16_geglu_tiles.py times them one by one)."""
    m, k = x.shape
    n = weight.shape[0] // 2
    if k % 8 or n % 8:
        raise ValueError(f"the fused bf16 GEGLU kernel needs K and N multiples of 8, got K={k}, N={n}")
    x, weight = aligned_for_tma(x, weight)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    (kernel or _bf16_geglu_kernel)[output_tile_grid(m, n)](
        tma_descriptor(x),
        tma_descriptor(weight),
        bias if bias is not None else weight,  # any pointer: unread without a bias
        tma_descriptor(out),
        m,
        n,
        k,
        HAS_BIAS=bias is not None,
    )
    return out
