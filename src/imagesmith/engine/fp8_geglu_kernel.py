"""The Triton kernel behind engine/fp8_geglu.py: one fp8 matmul with two accumulators and GEGLU in its epilogue.

For each output tile it multiplies the e4m3 input rows by the weight's value rows and by its gate rows (the two
halves of the feed-forward's first linear, [2N, K]), then, still in registers: both sums times the input's and the
weight's scales, plus their biases, value x gelu(gate) (exact, erf), divided by the next linear's static input
scale and written as e4m3. So the [M, 2N] bf16 product and the pass that read it back (the reason to fuse: ~670 MB
per feed-forward at the MLPerf batch) never exist.

Its tiles move by Hopper's tensor memory accelerator (TMA, through host-side tensor descriptors): bulk copies into
shared memory that Triton pipelines asynchronously, rows and columns past the edges read as zeros and clipped on
the store, so no masks. Measured on an H200 (run 58, in CUDA graphs): 865 TFLOP/s on the 1280-wide feed-forward
at UNet batch 16, 78 % of cuBLAS's plain fp8 matmul, with GEGLU in the epilogue; the same kernel with plain
loads (pipelined with cp.async) was 5-7 % slower on the large shapes and no faster on the small ones, so it went.

Imported only where Triton is (a CUDA machine); the module that calls it keeps an fp32 reference for the CPU.
"""

from __future__ import annotations

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

E4M3_MAX = tl.constexpr(448.0)  # a global a Triton kernel reads must be a constexpr


# Tiles for Hopper's fp8 tensor cores (wgmma wants K-tiles of 32+ and 64+ rows per warp group). Two fp32
# accumulators of BLOCK_M x BLOCK_N live in registers at once, so 128x128 tiles take 8 warps (64 registers each
# per accumulator) where a single-accumulator matmul would use 4. Autotuned per (M, N, K) on the first call: the two
# that won at every SDXL shape in run 58 (128x128x128, 3 or 4 stages), beside a shorter K step and a tile for few
# rows, for other widths; run 58's other three (128x64, 256x64, 5 stages) never won, and each candidate costs a
# compile and a timing at the first start.
_CONFIGS = tma_configs(
    [(128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 64, 8, 4), (64, 128, 128, 4, 4)],
    weight_rows_per_column=1,
)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _fp8_geglu_kernel(
    x_desc,  # [M, K] e4m3
    w_desc,  # [2N, K] e4m3: the value rows, then the gate rows
    bias_ptr,
    descale_ptr,
    out_scale_ptr,
    out_desc,  # [M, N] e4m3
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

    value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = x_desc.load([row, k])
        # A value tile past column N reads gate rows: harmless, those output columns are clipped on the store.
        value = tl.dot(a, w_desc.load([col, k]).T, value)
        gate = tl.dot(a, w_desc.load([N + col, k]).T, gate)

    descale = tl.load(descale_ptr)
    value = value * descale
    gate = gate * descale
    if HAS_BIAS:
        cols = (col + tl.arange(0, BLOCK_N)) % N
        value += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        gate += tl.load(bias_ptr + N + cols).to(tl.float32)[None, :]
    y = value * gelu_exact(gate)
    y = y * (1.0 / tl.load(out_scale_ptr))
    y = tl.minimum(tl.maximum(y, -E4M3_MAX), E4M3_MAX)
    out_desc.store([row, col], y.to(tl.float8e4nv))


def fp8_geglu_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    descale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """x [M, K] e4m3, weight [2N, K] e4m3 -> [M, N] e4m3 (engine/fp8_geglu.py's op says what it computes).
    TMA reads rows 16-byte aligned: K and N multiples of 16 (engine/fp8_geglu.py fuses only such layers)."""
    m, k = x.shape
    n = weight.shape[0] // 2
    if k % 16 or n % 16:
        raise ValueError(f"the fused GEGLU kernel needs K and N multiples of 16, got K={k}, N={n}")
    x, weight = aligned_for_tma(x, weight)
    out = torch.empty((m, n), device=x.device, dtype=torch.float8_e4m3fn)
    _fp8_geglu_kernel[output_tile_grid(m, n)](
        tma_descriptor(x),
        tma_descriptor(weight),
        bias if bias is not None else descale,  # any pointer: unread without a bias
        descale,
        out_scale,
        tma_descriptor(out),
        m,
        n,
        k,
        HAS_BIAS=bias is not None,
    )
    return out
