"""The feed-forward's GEGLU fused into its first fp8 matmul (with static fp8 scales): IMAGESMITH_FP8_FUSED_GEGLU.

Why: every SDXL transformer block ends in a feed-forward, Linear(D, 2N) -> GEGLU -> Linear(N, D). With static fp8
(engine/fp8.py) the first linear is a cuBLAS fp8 matmul writing its [M, 2N] product in bf16, and one inductor
kernel reads that back to compute value x gelu(gate) and cast it to e4m3 for the second linear. At the MLPerf
batch (UNet batch 16) that product is 335 MB per block at the 32x32 level (60 blocks) and 671 MB at the 64x64 one
(10 blocks): written once and read once, ~40 GB a base call, ~10 ms of its ~189 at the card's bandwidth, besides
the GEGLU kernel's own launch. cuBLAS cannot fuse it (its epilogues see one output element at a time, and GEGLU
pairs column j with column j + N), so engine/fp8_geglu_kernel.py is one Triton matmul computing the value and the
gate side by side and writing only the e4m3 result.

How: `fuse_geglu_feed_forwards` replaces each diffusers FeedForward whose GEGLU projection and output linear are
static-scaled Float8Linear layers with `Fp8GegluFeedForward`, which keeps both layers (their weights and
calibrated scales, which calibration still learns through the unfused path) and, once calibrated, runs the
custom op `imagesmith::fp8_geglu` (opaque to torch.compile like engine/fp8_conv.py's) and the second layer's
matmul on its e4m3 output. Off the GPU the op computes the same quantized arithmetic in fp32 (tests, not speed).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from imagesmith.engine.fp8 import Float8Linear, replace_modules, to_e4m3
from imagesmith.engine.geglu_feed_forward import geglu_feed_forward_parts


@torch.library.custom_op("imagesmith::fp8_geglu", mutates_args=())
def fp8_geglu(
    x: torch.Tensor,
    weight: torch.Tensor,
    descale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """x [M, K] e4m3, weight [2N, K] e4m3 (value rows, then gate rows), descale [1] (x's scale x weight's),
    bias [2N] or None, out_scale [1]: e4m3((value x gelu(gate)) / out_scale), [M, N], where
    [value | gate] = x @ weight.T x descale + bias."""
    if x.is_cuda:
        from imagesmith.engine.fp8_geglu_kernel import (
            fp8_geglu_cuda,  # needs Triton: imported on the GPU only
        )

        return fp8_geglu_cuda(x, weight, descale, bias, out_scale)
    # Off the GPU: the same quantized operands in fp32 (what the tests check the wiring with).
    product = (x.float() @ weight.float().t()) * descale.float()
    if bias is not None:
        product = product + bias.float()
    value, gate = product.chunk(2, dim=-1)
    return to_e4m3(value * F.gelu(gate), out_scale.float())


@fp8_geglu.register_fake
def _fp8_geglu_shape(
    x: torch.Tensor,
    weight: torch.Tensor,
    descale: torch.Tensor,
    bias: torch.Tensor | None,
    out_scale: torch.Tensor,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0] // 2), dtype=torch.float8_e4m3fn)


class Fp8GegluFeedForward(nn.Module):
    """A diffusers FeedForward (GEGLU, dropout, linear) whose two linears are static fp8: once both input scales
    are calibrated, the first linear and GEGLU are one kernel writing e4m3 for the second."""

    def __init__(self, feed_forward: FeedForward) -> None:
        super().__init__()
        if not fusable(feed_forward):
            raise ValueError(f"not a static-fp8 GEGLU feed-forward: {feed_forward}")
        self.proj = cast(Float8Linear, feed_forward.net[0].proj)  # what fusable checked
        self.out = cast(Float8Linear, feed_forward.net[2])

    def _fused(self) -> bool:
        # Calibration (and a layer not yet calibrated) takes the unfused path: it is where the second linear
        # learns its input's scale, which the fused kernel divides by.
        layers = (self.proj, self.out)
        return all(layer.input_scale is not None and layer.calibration_amax is None for layer in layers)

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if not self._fused():
            value, gate = self.proj(hidden_states).chunk(2, dim=-1)
            return self.out(value * F.gelu(gate))
        proj, out = self.proj, self.out
        assert proj.input_scale is not None and out.input_scale is not None  # what _fused checked
        leading = hidden_states.shape[:-1]
        rows = to_e4m3(hidden_states.reshape(-1, proj.in_features), proj.input_scale)
        descale = (proj.input_scale * proj.weight_scale).reshape(1)
        gated = torch.ops.imagesmith.fp8_geglu(
            rows, proj.weight_fp8, descale, proj.bias, out.input_scale.reshape(1)
        )
        return out.matmul_e4m3(gated, out.input_scale).reshape(*leading, out.out_features)

    def extra_repr(self) -> str:
        return "GEGLU fused into the first fp8 matmul once calibrated"


def fusable(module: nn.Module) -> bool:
    """A GEGLU FeedForward (engine/geglu_feed_forward.py), both linears static-scaled fp8, of widths the kernel
    takes."""
    parts = geglu_feed_forward_parts(module)
    if parts is None:
        return False
    proj, out = parts
    return (
        isinstance(proj, Float8Linear)
        # The kernel's TMA reads e4m3 rows in 16-byte steps: K and N (half the projection) multiples of 16.
        and proj.in_features % 16 == 0
        and proj.out_features % 32 == 0
        and isinstance(out, Float8Linear)
        and proj.scaling == out.scaling == "static"
    )


def fuse_geglu_feed_forwards(unet: nn.Module) -> int:
    """Swap the UNet's fusable feed-forwards (after engine/fp8.py quantized their linears) for
    Fp8GegluFeedForward; returns how many."""
    targets = [(name, m) for name, m in unet.named_modules() if fusable(m)]
    return replace_modules(unet, targets, Fp8GegluFeedForward)
