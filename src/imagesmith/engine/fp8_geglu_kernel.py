"""The Triton kernel behind engine/fp8_geglu.py: one fp8 matmul with two accumulators and GEGLU in its epilogue.

For each output tile it multiplies the e4m3 input rows by the weight's value rows and by its gate rows (the two
halves of the feed-forward's first linear, [2N, K]), then, still in registers: both sums times the input's and the
weight's scales, plus their biases, value x gelu(gate) (exact, erf), divided by the next linear's static input
scale and written as e4m3. So the [M, 2N] bf16 product and the pass that read it back (the reason to fuse: ~670 MB
per feed-forward at the MLPerf batch) never exist.

Imported only where Triton is (a CUDA machine); the module that calls it keeps an fp32 reference for the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)  # a global a Triton kernel reads must be a constexpr

# Tiles for Hopper's fp8 tensor cores (wgmma wants K-tiles of 32+ and 64+ rows per warp group). Two fp32
# accumulators of BLOCK_M x BLOCK_N live in registers at once, so 128x128 tiles take 8 warps (64 registers each
# per accumulator) where a single-accumulator matmul would use 4. Autotuned per (M, N, K) on the first call.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 128, 8, 3),
        (128, 128, 128, 8, 4),
        (128, 128, 64, 8, 4),
        (128, 64, 128, 4, 4),
        (64, 128, 128, 4, 4),
        (128, 64, 128, 8, 4),
        (256, 64, 128, 8, 3),
        (64, 64, 128, 4, 5),
    ]
]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _fp8_geglu_kernel(
    x_ptr,  # [M, K] e4m3, row-major
    w_ptr,  # [2N, K] e4m3, row-major: rows 0..N-1 the value, N..2N-1 the gate (diffusers' GEGLU chunk order)
    bias_ptr,  # [2N] or unused
    descale_ptr,  # [1] fp32: input scale x weight scale
    out_scale_ptr,  # [1] fp32: the next linear's input scale
    out_ptr,  # [M, N] e4m3
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # Rows and columns past the edge wrap around instead of being masked on every load; the store masks them.
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    # [BLOCK_K, BLOCK_N] views of the weight's rows: K-contiguous, the operand layout fp8 wgmma reads.
    value_tile = w_ptr + cols[None, :] * stride_wn + ks[:, None]
    gate_tile = value_tile + N * stride_wn

    value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_tile)
            bv = tl.load(value_tile)
            bg = tl.load(gate_tile)
        else:
            left = K - k
            a = tl.load(x_tile, mask=ks[None, :] < left, other=0.0)
            bv = tl.load(value_tile, mask=ks[:, None] < left, other=0.0)
            bg = tl.load(gate_tile, mask=ks[:, None] < left, other=0.0)
        # Accumulating inside the dot (not `acc += dot`) is Hopper's fast fp8 accumulation, as cuBLAS's
        # use_fast_accum=True in the unfused path (engine/fp8.py).
        value = tl.dot(a, bv, value)
        gate = tl.dot(a, bg, gate)
        x_tile += BLOCK_K
        value_tile += BLOCK_K
        gate_tile += BLOCK_K

    descale = tl.load(descale_ptr)
    value = value * descale
    gate = gate * descale
    if HAS_BIAS:
        value += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        gate += tl.load(bias_ptr + N + cols).to(tl.float32)[None, :]
    y = value * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))
    y = y * (1.0 / tl.load(out_scale_ptr))
    y = tl.minimum(tl.maximum(y, -E4M3_MAX), E4M3_MAX)

    out_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out = out_ptr + out_rows[:, None] * stride_om + out_cols[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(out_rows[:, None] < M) & (out_cols[None, :] < N))


def _set_tma_blocks(args: dict[str, Any]) -> None:
    """Autotuning tries several tile shapes; each config gives the TMA descriptors their block before a launch."""
    bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    args["x_desc"].block_shape = [bm, bk]
    args["w_desc"].block_shape = [bn, bk]
    args["out_desc"].block_shape = [bm, bn]


_TMA_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        num_warps=w,
        num_stages=s,
        pre_hook=_set_tma_blocks,
    )
    for bm, bn, bk, w, s in [
        (128, 128, 128, 8, 3),
        (128, 128, 128, 8, 4),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 8, 5),
        (128, 64, 128, 4, 4),
        (64, 128, 128, 4, 4),
        (256, 64, 128, 8, 3),
    ]
]


@triton.autotune(configs=_TMA_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _fp8_geglu_tma_kernel(
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
    """The same arithmetic as _fp8_geglu_kernel, its tiles moved by Hopper's tensor memory accelerator (TMA):
    bulk copies into shared memory that Triton pipelines asynchronously, out-of-bounds rows and columns read as
    zeros and clipped on the store, so no masks and no address arithmetic per element."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    row = pid_m * BLOCK_M
    col = pid_n * BLOCK_N

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
    y = value * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))
    y = y * (1.0 / tl.load(out_scale_ptr))
    y = tl.minimum(tl.maximum(y, -E4M3_MAX), E4M3_MAX)
    out_desc.store([row, col], y.to(tl.float8e4nv))


def tma_ready(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned rows (K and N multiples of 16 for e4m3) and base addresses."""
    n = weight.shape[0] // 2
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(1) == 1 for t in (x, weight))
    return aligned and x.shape[1] % 16 == 0 and n % 16 == 0


def fp8_geglu_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    descale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
    tma: bool | None = None,
) -> torch.Tensor:
    """x [M, K] e4m3, weight [2N, K] e4m3 -> [M, N] e4m3 (engine/fp8_geglu.py's op says what it computes).
    tma: the TMA kernel (None: wherever the shapes allow it), else the one with plain loads."""
    m, k = x.shape
    n = weight.shape[0] // 2
    out = torch.empty((m, n), device=x.device, dtype=torch.float8_e4m3fn)

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if tma is None:
        tma = tma_ready(x, weight)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        placeholder = [16, 16]  # each config's pre_hook sets the real block shapes
        _fp8_geglu_tma_kernel[grid](
            TensorDescriptor.from_tensor(x, placeholder),
            TensorDescriptor.from_tensor(weight, placeholder),
            bias if bias is not None else descale,
            descale,
            out_scale,
            TensorDescriptor.from_tensor(out, placeholder),
            m,
            n,
            k,
            HAS_BIAS=bias is not None,
        )
        return out
    _fp8_geglu_kernel[grid](
        x,
        weight,
        bias if bias is not None else descale,  # any pointer: unread without a bias
        descale,
        out_scale,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
    )
    return out
