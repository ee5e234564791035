"""The feed-forward's GEGLU fused into its first bf16 matmul: IMAGESMITH_FUSED_GEGLU (exact within bf16 rounding).

Why: every SDXL transformer block ends in a feed-forward, Linear(D, 2N) -> GEGLU -> Linear(N, D). Compiled, the
first linear is a cuBLAS matmul writing its [M, 2N] product in bf16 and one inductor kernel reads it back for
value x gelu(gate): 1.69 ms of a 30.3 ms base UNet call at batch 2 (70 launches, run 91, H100). cuBLAS cannot fuse
it (its epilogues see one output element at a time, and GEGLU pairs column j with column j + N), so
engine/bf16_geglu_kernel.py is one Triton matmul writing only the [M, N] result. It pays only where its matmul
keeps close to cuBLAS's rate: the fp8 version (engine/fp8_geglu.py) ran 22 % behind and kept little of its gain.

How: `fuse_bf16_geglu_feed_forwards` replaces each diffusers FeedForward of GEGLU (exact gelu) and plain linears
with `FusedGegluFeedForward`, which keeps the first linear's weight with its value and gate rows interleaved (the
layout the kernel reads, made once; the original is dropped, so no memory is added) and the second linear as it
was. The custom op `imagesmith::bf16_geglu` is opaque to torch.compile, as the fp8 ones are. Off the GPU, or in
another dtype, the op computes the same thing in fp32 (tests, not speed).

Measured (docs/benchmarks.md, runs 97-98, H100): the kernel runs at 78-92 % of cuBLAS's matmul rate, and the
40-step ensemble went 1.301 -> 1.280 s at the same fidelity. Folding the layer norm before the feed-forward into
the kernel as well was tried and lost 2.7 ms a base call (the moments took the x tile off the TMA-to-tensor-core
path); it is in git at e1616df.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from imagesmith.engine.fp8 import replace_modules
from imagesmith.engine.geglu_feed_forward import geglu_feed_forward_parts
from imagesmith.engine.kernel_check import output_fault


def interleave_halves(rows: torch.Tensor) -> torch.Tensor:
    """[value; gate] stacked along dim 0 (2N rows) -> value 0, gate 0, value 1, gate 1, ... (the kernel's layout)."""
    value, gate = rows.chunk(2, dim=0)
    return torch.stack((value, gate), dim=1).reshape(rows.shape)


@torch.library.custom_op("imagesmith::bf16_geglu", mutates_args=())
def bf16_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K], weight [2N, K] with value and gate rows interleaved, bias [2N] (the same) or None:
    value x gelu(gate) [M, N] in x's dtype, where value = x @ weight[0::2].T + bias[0::2] and gate likewise
    from the odd rows (exact gelu, erf)."""
    if x.is_cuda and x.dtype == torch.bfloat16:
        from imagesmith.engine.bf16_geglu_kernel import bf16_geglu_cuda  # needs Triton: on the GPU only

        return bf16_geglu_cuda(x, weight, bias)
    product = x.float() @ weight.float().t()
    if bias is not None:
        product = product + bias.float()
    return (product[:, 0::2] * F.gelu(product[:, 1::2])).to(x.dtype)


@bf16_geglu.register_fake
def _bf16_geglu_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0] // 2))


def kernel_fault(device: torch.device | str, kernel: Callable[..., torch.Tensor] | None = None) -> str | None:
    """Run the kernel once on `device` at a small shape (rows, K and N none of them a multiple of a tile) against
    the fp32 reference; None where it agrees within bf16 rounding, else what went wrong, in a line.

    Why: the kernel is on by default on Hopper, and Triton compiles it on the first call. A kernel that does not
    compile there (a Triton release that refuses it, run 96) would otherwise fail inside a torch.compile warm-up
    and its CUDA-graph recording (a segfault, run 96), and a GPU it was never measured on could compute it wrong.
    Checked before any module is swapped, the engine can start without it instead. The check autotunes the
    kernel's configs once (seconds; Triton caches the compiled kernels on disk)."""
    kernel = kernel or torch.ops.imagesmith.bf16_geglu
    generator = torch.Generator().manual_seed(0)
    rows, k, n = 200, 328, 264
    x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
    weight = interleave_halves((torch.randn(2 * n, k, generator=generator) / k**0.5).to(torch.bfloat16))
    bias = interleave_halves((torch.randn(2 * n, generator=generator) * 0.1).to(torch.bfloat16))
    expected = bf16_geglu(x, weight, bias).float()  # on the CPU: the fp32 reference
    return output_fault(
        lambda: kernel(x.to(device), weight.to(device), bias.to(device)), expected, "the fp32 reference"
    )


class FusedGegluFeedForward(nn.Module):
    """A diffusers FeedForward (GEGLU, dropout, linear) whose first linear and GEGLU are one kernel."""

    def __init__(self, feed_forward: FeedForward) -> None:
        super().__init__()
        if not fusable(feed_forward):
            raise ValueError(f"not a plain GEGLU feed-forward: {feed_forward}")
        proj = cast(nn.Linear, feed_forward.net[0].proj)  # what fusable checked
        self.in_features = proj.in_features
        weight = proj.weight.detach()
        bias = None if proj.bias is None else proj.bias.detach()
        self.weight = nn.Parameter(interleave_halves(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(interleave_halves(bias), requires_grad=False)
        self.out = cast(nn.Linear, feed_forward.net[2])

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        leading = hidden_states.shape[:-1]
        rows = hidden_states.reshape(-1, self.in_features)
        gated = torch.ops.imagesmith.bf16_geglu(rows, self.weight, self.bias)
        return self.out(gated).reshape(*leading, self.out.out_features)

    def extra_repr(self) -> str:
        return f"GEGLU fused into the first matmul, {self.in_features} -> {self.weight.shape[0] // 2}"


def fusable(module: nn.Module) -> bool:
    """A GEGLU FeedForward (engine/geglu_feed_forward.py), both linears plain nn.Linear (not fp8), of widths the
    kernel's TMA reads take (rows of 16 bytes: multiples of 8 in bf16)."""
    parts = geglu_feed_forward_parts(module)
    if parts is None:
        return False
    proj, out = parts
    return (
        type(proj) is nn.Linear
        and type(out) is nn.Linear
        and proj.in_features % 8 == 0
        and proj.out_features % 16 == 0
    )


def fuse_bf16_geglu_feed_forwards(unet: nn.Module) -> int:
    """Swap the UNet's fusable feed-forwards for FusedGegluFeedForward; returns how many."""
    targets = [(name, m) for name, m in unet.named_modules() if fusable(m)]
    return replace_modules(unet, targets, FusedGegluFeedForward)
