"""fp8 linear layers for the UNets' transformer blocks (opt-in, lossy): IMAGESMITH_FP8=true.

Why our own and not torchao's float8 tensor subclass: with torchao 0.17 on torch 2.11, torch.compile of the SDXL
UNet with quantized weights did not finish in 330 s (one UNet) or 540 s (both), on an H200 (docs/benchmarks.md,
runs 7-8), against ~90 s per UNet in bf16. Plain tensors and one `torch._scaled_mm` call compile like any bf16
layer (run 9: 286 s for both UNets and the VAE).

The arithmetic: weights stored in float8 e4m3 with fp32 scales (absmax / 448), activations cast to e4m3 with
their own scales, the product accumulated by the tensor cores and written in the compute dtype. Three ways to
scale (HardwarePlan.fp8 chooses, from IMAGESMITH_FP8_SCALES and the card):
- "static" (the default): one scale per tensor for the weight and one for the layer's input, the latter
  calibrated once at start-up from a real generation (`calibrate_static_scales`). Quantizing an input is then
  a multiply and a cast, which inductor fuses into the kernel that produces the input (a layer norm, the
  GEGLU), and the bias goes into the matmul's epilogue.
- "row-wise" (IMAGESMITH_FP8_SCALES=dynamic on Hopper): one scale per input row and per output row of the
  weight, computed on every call: a reduction over each activation before its matmul.
- "per-tensor" (dynamic on Ada, compute capability 8.9, which has no row-wise fp8 matmul): one scale per
  tensor, computed on every call.

Why static is the default, measured on an H200 (benchmarks/fp8_gemm.py, run 45, batch 16 = the MLPerf batch 8
with guidance): the transformer linears of one base UNet call take 104.5 ms in bf16, 142 ms as row-wise fp8 with
the bias added after the matmul (the recipe before run 45), 69 ms as per-tensor fp8 with the bias fused and
cuBLAS's fast accumulation; computing the activations' scales costs 77 ms a call when not fused, a fixed scale's
multiply-and-cast 40 ms at most (less once fused into its producer). Run 16's row-wise fp8 gave 1.66 images/s
against bf16's 1.62; static fp8 gives 1.91 against 1.61 (the engine, one process, run 47; dynamic row-wise 1.64,
run 48), and the 40-step ensemble in 1.21 s against bf16's 1.38 and row-wise fp8's 1.50 (runs 46, 40), at the same
fidelity as row-wise (PSNR 43.9 against 43.6 dB).

Compiled only: eager, a static layer's quantization is four small kernels (cast, divide, clamp, cast) beside its
matmul, and the batch-1 UNet call is launch-bound, so the eager ensemble took 3.63 s against eager bf16's 2.08 s
(run 47). The plan says so when fp8 is asked for without IMAGESMITH_COMPILE.

Only the linears inside the transformer blocks (attentions.*: QKV, out, feed-forward, proj_in/out) are
converted: they carry ~64 % of the UNet's FLOPs with many rows per call. The time-embedding linears (a few rows)
stay in the compute dtype, and so do the convolutions unless IMAGESMITH_FP8_CONVS asks for cuDNN's fp8 ones
(engine/fp8_conv.py), whose layers share this module's input scaling (Fp8Layer) and calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_TINY = 1e-12  # keeps an all-zero row from dividing by zero
SCALINGS = ("static", "row-wise", "per-tensor")
# A static scale covers `CALIBRATION_HEADROOM` times the largest input seen while calibrating, so a prompt that
# drives a layer harder than the calibration's did is not clipped at once. The price is small: e4m3 is a float
# format (its precision is relative), and 2x headroom only moves one binade of the smallest inputs into e4m3's
# subnormals, inputs 2^-14 of the largest and below, which add next to nothing to a dot product.
CALIBRATION_HEADROOM = 2.0


def e4m3_scales(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """fp32 scale so that x / scale fits e4m3: per row (shape [rows, 1]) or per tensor (shape [1, 1])."""
    if rowwise:
        amax = x.abs().amax(dim=-1, keepdim=True)
    else:
        amax = x.abs().amax().reshape(1, 1)
    return amax.float().clamp(min=_TINY) / E4M3_MAX


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in e4m3; values past e4m3's range saturate at +-448 instead of becoming NaN."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


class Fp8Layer(nn.Module):
    """What every fp8 layer (this module's linears, engine/fp8_conv.py's convolutions) does with its input's scale:
    a "static" layer uses the one calibrated by `calibrate_static_scales` (per tensor, computed per call until
    then); the others compute theirs per call, per row ("row-wise") or per tensor ("per-tensor")."""

    weight_fp8: nn.Parameter  # each subclass's weight in e4m3

    def __init__(self, scaling: str) -> None:
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        self.scaling = scaling
        # Static scaling: the input's scale once calibrated (None before). A buffer, so that torch.compile takes
        # it as an input of the graph like the weights (not as a constant baked into the kernels, which would
        # make the compile cache's key depend on its value); not saved in state dicts.
        self.input_scale: torch.Tensor | None
        self.register_buffer("input_scale", None, persistent=False)
        # The largest input seen while calibrating; None when not calibrating.
        self.calibration_amax: torch.Tensor | None = None

    @property
    def rowwise(self) -> bool:
        return self.scaling == "row-wise"

    @property
    def device(self) -> torch.device:
        """Where the layer runs (its calibration's running maximum lives there)."""
        return self.weight_fp8.device

    def _input_scale(self, rows: torch.Tensor) -> torch.Tensor:
        if self.calibration_amax is not None:
            # On the device, no sync: the largest absolute input so far, per layer.
            self.calibration_amax = torch.maximum(self.calibration_amax, rows.abs().amax().float())
        if self.input_scale is not None and self.calibration_amax is None:
            return self.input_scale
        return e4m3_scales(rows, self.rowwise)

    def _scaling_repr(self) -> str:
        state = ""
        if self.scaling == "static":
            state = " calibrated" if self.input_scale is not None else " uncalibrated"
        return f"e4m3 {self.scaling}{state}"


class Float8Linear(Fp8Layer):
    """y = x @ W.T + b with W in float8 e4m3; a drop-in for nn.Linear at inference.

    `scaling` is one of SCALINGS (the module docstring says what each does). A "static" layer scales its inputs
    dynamically (per tensor) until `calibrate_static_scales` has given it its fixed scale."""

    def __init__(self, linear: nn.Linear, scaling: str) -> None:
        super().__init__(scaling)
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = e4m3_scales(weight, self.rowwise)  # [out, 1] or [1, 1]
        self.weight_fp8 = nn.Parameter(to_e4m3(weight, scale), requires_grad=False)
        # _scaled_mm wants the second operand's scale as [1, out] (row-wise) or [1, 1].
        self.weight_scale = nn.Parameter(scale.reshape(1, -1), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        x_scale = self._input_scale(rows)
        y = self.matmul_e4m3(to_e4m3(rows, x_scale), x_scale)
        return y.reshape(*leading, self.out_features)

    def matmul_e4m3(self, x_fp8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The layer on input rows already in e4m3 ([rows, in], scaled by x_scale): [rows, out] in out_dtype.
        engine/fp8_geglu.py calls it with rows its kernel wrote in e4m3."""
        if x_fp8.is_cuda:
            # weight_fp8 is [out, in] row-major, so .t() is the column-major [in, out] that _scaled_mm needs.
            # Fast accumulation: Hopper's fp8 tensor cores keep partial sums in reduced precision rather than
            # stopping to promote them to fp32; 5-7 % faster (run 45), within fp8's own error. With one scale per
            # tensor the bias goes into cuBLAS's epilogue (measured: the extra pass over the output cost as much
            # as the fp8 matmul saved). Row-wise, it is still added after, as before run 45 (the row-wise kernel
            # with a bias is untested here); compiled, inductor folds that add into the next kernel.
            fused_bias = self.bias is not None and not self.rowwise
            y = torch._scaled_mm(
                x_fp8,
                self.weight_fp8.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale,
                bias=self.bias if fused_bias else None,
                out_dtype=self.out_dtype,
                use_fast_accum=True,
            )
            if self.bias is not None and not fused_bias:
                y = y + self.bias
            return y
        # No fp8 matmul off the GPU: the same quantized operands, multiplied in fp32 (tests, not speed).
        weight = self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)
        y = ((x_fp8.float() * x_scale) @ weight.t()).to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self._scaling_repr()}"


def quantize_transformer_linears(unet: nn.Module, scaling: str) -> int:
    """Swap the nn.Linear layers under the UNet's attentions.* for Float8Linear; returns how many. The hardware
    plan chooses the scaling (HardwarePlan.fp8): row-wise needs Hopper."""
    targets = [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear)
        and ".attentions." in f".{name}"
        # _scaled_mm needs both matrix dimensions divisible by 16 (every SDXL transformer linear is).
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    ]
    return replace_modules(unet, targets, lambda linear: Float8Linear(linear, scaling))


def replace_modules(root: nn.Module, targets: list[tuple[str, Any]], make: Callable[[Any], nn.Module]) -> int:
    """Put make(module) where each (qualified name, module) of `root` was; returns how many."""
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, make(module))
    return len(targets)


def static_layers(models: Iterable[nn.Module]) -> list[Fp8Layer]:
    """The static-scaled fp8 layers of these models (linears and convolutions), each once."""
    found: dict[int, Fp8Layer] = {}
    for model in models:
        for module in model.modules():
            if isinstance(module, Fp8Layer) and module.scaling == "static":
                found.setdefault(id(module), module)
    return list(found.values())


def calibrate_static_scales(layers: list[Fp8Layer], run: Callable[[], object]) -> int:
    """Give each static layer its input scale: `run` (a real generation, eager) while every layer records the
    largest input it sees; then scale = that x CALIBRATION_HEADROOM / 448. Returns how many layers ran. A layer
    that `run` never reached keeps scaling per call (logged): slower, never wrong."""
    for layer in layers:
        layer.input_scale = None
        layer.calibration_amax = torch.zeros((), device=layer.device)
    try:
        run()
        seen = [layer.calibration_amax for layer in layers]
    finally:
        for layer in layers:
            layer.calibration_amax = None
    reached = 0
    for layer, amax in zip(layers, seen, strict=True):
        assert amax is not None
        if float(amax) == 0.0:
            continue  # never ran, or only ever saw zeros: no scale to learn
        layer.input_scale = (amax * CALIBRATION_HEADROOM / E4M3_MAX).reshape(1, 1)
        reached += 1
    if reached < len(layers):
        log.warning("fp8 calibration reached %d of %d layers; the rest scale per call", reached, len(layers))
    return reached
