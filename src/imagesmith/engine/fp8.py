"""fp8 linear layers for the UNets' transformer blocks (opt-in, lossy): IMAGESMITH_FP8=true.

Why our own and not torchao's float8 tensor subclass: with torchao 0.17 on torch 2.11, torch.compile of the SDXL
UNet with quantized weights did not finish in 330 s (one UNet) or 540 s (both), on an H200 (docs/benchmarks.md,
runs 7-8), against ~90 s per UNet in bf16. Plain tensors and one `torch._scaled_mm` call compile like any bf16
layer (run 9: 286 s for both UNets and the VAE).

What it buys, measured on an H200 (runs 9 and 16): memory (the transformer weights in one byte: 8.8 vs 12.1 GiB
at batch 1, 4.5 vs 6.6 GiB at batch 8), not speed (slower at batch 1, +3 % at batch 8). The per-call absmax and
cast of the activations cost about what the fp8 matmul saves.

The arithmetic: weights stored in float8 e4m3 with one fp32 scale per output row (absmax / 448), activations cast
per call with one scale per input row, the product accumulated in fp32 by the tensor cores and written in the
compute dtype. Row-wise scales need Hopper (compute capability 9.0); on 8.9 (Ada) one scale per tensor.

Only the linears inside the transformer blocks (attentions.*: QKV, out, feed-forward, proj_in/out) are
converted: they carry ~64 % of the UNet's FLOPs with many rows per call. The time-embedding linears (a few rows)
and every convolution stay in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_TINY = 1e-12  # keeps an all-zero row from dividing by zero


def _scales(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """fp32 scale so that x / scale fits e4m3: per row (shape [rows, 1]) or per tensor (shape [1, 1])."""
    if rowwise:
        amax = x.abs().amax(dim=-1, keepdim=True)
    else:
        amax = x.abs().amax().reshape(1, 1)
    return amax.float().clamp(min=_TINY) / E4M3_MAX


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


class Float8Linear(nn.Module):
    """y = x @ W.T + b with W in float8 e4m3; a drop-in for nn.Linear at inference."""

    def __init__(self, linear: nn.Linear, rowwise: bool) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rowwise = rowwise
        scale = _scales(weight, rowwise)  # [out, 1] or [1, 1]
        self.weight_fp8 = nn.Parameter(to_e4m3(weight, scale), requires_grad=False)
        # _scaled_mm wants the second operand's scale as [1, out] (row-wise) or [1, 1].
        self.weight_scale = nn.Parameter(scale.reshape(1, -1), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        x_scale = _scales(rows, self.rowwise)
        x_fp8 = to_e4m3(rows, x_scale)
        if x.is_cuda:
            # weight_fp8 is [out, in] row-major, so .t() is the column-major [in, out] that _scaled_mm needs.
            y = torch._scaled_mm(
                x_fp8,
                self.weight_fp8.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale,
                out_dtype=self.out_dtype,
            )
        else:
            # No fp8 matmul off the GPU: the same quantized operands, multiplied in fp32 (tests, not speed).
            weight = self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)
            y = ((x_fp8.float() * x_scale) @ weight.t()).to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        scaling = "row-wise" if self.rowwise else "per-tensor"
        return f"in={self.in_features}, out={self.out_features}, e4m3 {scaling}"


def quantize_transformer_linears(unet: nn.Module, rowwise: bool) -> int:
    """Swap the nn.Linear layers under the UNet's attentions.* for Float8Linear; returns how many. Row-wise
    scales need Hopper; the hardware plan chooses (HardwarePlan.fp8)."""
    targets = [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear)
        and ".attentions." in f".{name}"
        # _scaled_mm needs both matrix dimensions divisible by 16 (every SDXL transformer linear is).
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, Float8Linear(module, rowwise))
    return len(targets)
