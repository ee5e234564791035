"""What the fused GEGLU Triton kernels (engine/fp8_geglu_kernel.py, engine/bf16_geglu_kernel.py) share: their
autotuned tile shapes with the TMA descriptors' blocks, the launch grid and grouped order of their output tiles,
and the exact gelu of their epilogues.

Imported only where Triton is (a CUDA machine)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


def tma_configs(
    tiles: list[tuple[int, int, int, int, int]], weight_rows_per_column: int
) -> list[triton.Config]:
    """One autotuning config per (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Each sets the blocks of the kernel's
    descriptors x_desc [M, K], w_desc and out_desc [M, N] before its launch; the weight's tile is
    `weight_rows_per_column` x BLOCK_N rows tall (2 where value and gate rows are interleaved, 1 where the kernel
    loads the two halves apart)."""

    def set_blocks(args: dict[str, Any]) -> None:
        bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
        args["x_desc"].block_shape = [bm, bk]
        args["w_desc"].block_shape = [weight_rows_per_column * bn, bk]
        args["out_desc"].block_shape = [bm, bn]

    hook: Callable[[dict[str, Any]], None] = set_blocks
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=w,
            num_stages=s,
            pre_hook=hook,
        )
        for bm, bn, bk, w, s in tiles
    ]


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (first row, first column), in groups of GROUP_M row tiles that share each weight
    tile while it is in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m * BLOCK_M, pid_n * BLOCK_N


def tma_descriptor(tensor: torch.Tensor) -> TensorDescriptor:
    """A TMA descriptor of a kernel operand, its block shape a placeholder: each config's pre_hook (tma_configs)
    sets the real one before the launch."""
    return TensorDescriptor.from_tensor(tensor, [16, 16])


def output_tile_grid(m: int, n: int) -> Callable[[dict[str, Any]], tuple[int]]:
    """The launch grid for an [m, n] output: one program per BLOCK_M x BLOCK_N tile (grouped_tile orders them)."""

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    return grid


# No annotations on a jit function: Triton resolves them as globals, and typing's are no constexprs (run 96).
@triton.jit
def gelu_exact(gate):
    """gelu with erf, what torch's F.gelu and diffusers' GEGLU compute by default."""
    return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
