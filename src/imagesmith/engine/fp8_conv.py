"""fp8 convolutions for the UNets (opt-in, lossy, on top of fp8 linears with static scales): IMAGESMITH_FP8_CONVS.

Why: with the transformer linears in fp8 (engine/fp8.py) the largest block of bf16 work left in a UNet call is its
convolutions, 26 TFLOP per base call at the MLPerf batch. torch has no fp8 convolution; cuDNN has one on Hopper,
reachable through its graph API (the `cudnn` module of NVIDIA's `nvidia-cudnn-frontend` wheel, which uses the
libcudnn torch has loaded). Measured one shape at a time on an H200 (benchmarks/fp8_conv.py, run 51): the base
UNet's convolutions take 41.7 ms a call at batch 16 in bf16 and 36.4 ms in fp8 with cuDNN's fastest plan (the 3x3
ones at up to 914 TFLOP/s, the 1x1 ones ~1.5-2x faster than bf16's); at batch 2, 6.7 against 6.2 ms.
In the engine (run 52, MLPerf setting, batch 8, with static fp8 linears and reduce-overhead): 1.927 against 1.889
images/s on the same machine (+2.0 %), the first call 302 against 167 s (every shape's plans built and timed).
That run's UNet ran NCHW: inductor keeps channels-last only for graphs with a convolution per 300 nodes, and
the custom op hides 49 of 51; engine/fast.py forces the layout with fp8 convolutions: 1.948 images/s (run 53,
another machine; the same-process A/B did not fit a device call). The price is fidelity: the MLPerf image is
36.7 dB from eager bf16's, against 42.4 with fp8 linears alone.

How:
- Each eligible `nn.Conv2d` (1x1 or 3x3, stride 1 or 2, "same" padding, channels divisible by 16: every one but
  the UNet's conv_in and conv_out) becomes a `Float8Conv2d`: its filter in e4m3, laid out KRSC as cuDNN wants
  it, with one scale; its input scaled by one factor calibrated at start-up with the fp8 linears'
  (`calibrate_static_scales`), so the quantization is a multiply and a cast that inductor fuses into the kernel
  producing the input (the GroupNorm and SiLU before each ResNet convolution).
- The convolution is one custom op, `imagesmith::fp8_conv2d`, opaque to torch.compile (a fake implementation
  gives its output's shape): on a CUDA GPU a cuDNN graph per shape, e4m3 NHWC image and KRSC filter, fp32
  accumulation, and in the same kernel's epilogue the two scales' product and the bias, written in bf16. Off
  the GPU the same quantized operands are convolved in fp32 (tests, not speed).
- cuDNN's heuristic's first plan was up to 3x slower than its fastest on these shapes (2x over a call, run 51), so each
  shape's plans are timed once, on its first call, the fastest kept and remembered beside the compile cache
  (engine/cudnn_graphs.py, shared with any other cuDNN operation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagesmith.engine.cudnn_graphs import CudnnGraphs, shared
from imagesmith.engine.fp8 import Fp8Layer, e4m3_scales, replace_modules, to_e4m3

log = logging.getLogger(__name__)


def eligible(conv: nn.Conv2d) -> bool:
    """The convolutions cuDNN's fp8 kernels take here: plain 1x1 or 3x3, "same" padding, stride 1 or 2, and
    channel counts divisible by 16 (fp8 tensor cores read 16-byte vectors)."""
    k = conv.kernel_size
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and k in ((1, 1), (3, 3))
        and conv.stride in ((1, 1), (2, 2))
        and conv.padding == (k[0] // 2, k[1] // 2)
        and conv.padding_mode == "zeros"
        and conv.in_channels % 16 == 0
        and conv.out_channels % 16 == 0
    )


class Float8Conv2d(Fp8Layer):
    """A drop-in for an eligible nn.Conv2d at inference: filter and input in e4m3, static scales (the module
    docstring says how). Takes and returns NCHW tensors like the layer it replaces."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__("static")
        if not eligible(conv):
            raise ValueError(f"not a convolution fp8 handles here: {conv}")
        weight = conv.weight.detach()  # [K, C, R, S]
        scale = e4m3_scales(weight, rowwise=False)  # [1, 1]
        self.weight_fp8 = nn.Parameter(
            to_e4m3(weight.permute(0, 2, 3, 1).contiguous(), scale), requires_grad=False
        )
        self.weight_scale = nn.Parameter(scale.reshape(1), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel = conv.kernel_size[0]
        self.stride = conv.stride[0]
        self.padding = conv.padding[0]
        self.out_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._input_scale(x)  # [1, 1]
        # NHWC, as cuDNN's fp8 kernels read it: a view of a channels-last input, else one transposing write
        # fused with the quantization.
        image = to_e4m3(x.permute(0, 2, 3, 1), scale).contiguous()
        descale = (scale.reshape(1) * self.weight_scale).contiguous()
        y = torch.ops.imagesmith.fp8_conv2d(
            image, self.weight_fp8, descale, self.bias, self.stride, self.padding, self.out_dtype
        )
        return y.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}->{self.out_channels}, {self.kernel}x{self.kernel}, stride {self.stride}, "
            f"{self._scaling_repr()}"
        )


def quantize_convolutions(unet: nn.Module) -> int:
    """Swap the UNet's eligible nn.Conv2d layers for Float8Conv2d; returns how many."""
    targets = [(name, m) for name, m in unet.named_modules() if isinstance(m, nn.Conv2d) and eligible(m)]
    return replace_modules(unet, targets, Float8Conv2d)


@dataclass(frozen=True)
class _Convolution:
    """One call's operands: (image [N, H, W, C] e4m3) conv (weight [K, R, S, C] e4m3) x descale + bias."""

    image: torch.Tensor
    weight: torch.Tensor
    descale: torch.Tensor
    bias: torch.Tensor | None
    stride: int
    padding: int
    out_dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.image.device

    @property
    def batch(self) -> int:
        return int(self.image.shape[0])

    @property
    def family_key(self) -> tuple[object, ...]:
        return (tuple(self.image.shape[1:]), *self.shape_key[1:])

    @property
    def output_shape(self) -> tuple[int, ...]:
        n, h, w, _ = self.image.shape
        k, r, s, _ = self.weight.shape
        p = self.padding
        return (n, (h + 2 * p - r) // self.stride + 1, (w + 2 * p - s) // self.stride + 1, k)

    @property
    def shape_key(self) -> tuple[object, ...]:
        """Everything a cuDNN graph is specific to."""
        return (
            tuple(self.image.shape),
            tuple(self.weight.shape),
            self.stride,
            self.padding,
            self.bias is not None,
            str(self.out_dtype).removeprefix("torch."),
        )

    def new_output(self) -> torch.Tensor:
        return torch.empty(self.output_shape, device=self.image.device, dtype=self.out_dtype)


@torch.library.custom_op("imagesmith::fp8_conv2d", mutates_args=())
def fp8_conv2d(
    image: torch.Tensor,
    weight: torch.Tensor,
    descale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    padding: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(image [N, H, W, C] e4m3) conv (weight [K, R, S, C] e4m3) x descale + bias, as out_dtype [N, H', W', K]."""
    if image.is_cuda:
        return _CUDNN.run(_Convolution(image, weight, descale, bias, stride, padding, out_dtype))
    # Off the GPU: the same quantized operands in fp32 (what the tests check the wiring with).
    y = F.conv2d(
        image.float().permute(0, 3, 1, 2), weight.float().permute(0, 3, 1, 2), stride=stride, padding=padding
    )
    y = y * descale.float()
    if bias is not None:
        y = y + bias.float().reshape(1, -1, 1, 1)
    return y.to(out_dtype).permute(0, 2, 3, 1).contiguous()


@fp8_conv2d.register_fake
def _fp8_conv2d_shape(
    image: torch.Tensor,
    weight: torch.Tensor,
    descale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    padding: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    call = _Convolution(image, weight, descale, bias, stride, padding, out_dtype)
    return image.new_empty(call.output_shape, dtype=out_dtype)


class _CudnnFp8Convolutions(CudnnGraphs):
    """cuDNN graphs for fp8 convolutions: e4m3 NHWC image and KRSC filter, fp32 accumulation, the scales' product
    and the bias in the epilogue, bf16 (or fp16) out."""

    kind = "fp8 convolution"

    def describe(self, cudnn: Any, handle: Any, call: _Convolution) -> tuple[Any, dict[str, Any]]:
        dt = cudnn.data_type
        io = {torch.bfloat16: dt.BFLOAT16, torch.float16: dt.HALF}[call.out_dtype]
        n, h, w, c = call.image.shape
        k, r, s, _ = call.weight.shape
        graph = cudnn.pygraph(
            io_data_type=io, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT, handle=handle
        )
        x = graph.tensor(
            name="image", dim=[n, c, h, w], stride=[h * w * c, 1, w * c, c], data_type=dt.FP8_E4M3
        )
        f = graph.tensor(
            name="filter", dim=[k, c, r, s], stride=[r * s * c, 1, s * c, c], data_type=dt.FP8_E4M3
        )
        d = graph.tensor(name="descale", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)
        y = graph.conv_fprop(
            image=x,
            weight=f,
            padding=[call.padding, call.padding],
            stride=[call.stride, call.stride],
            dilation=[1, 1],
            compute_data_type=dt.FLOAT,
            name="conv",
        )
        y = graph.mul(a=y, b=d, compute_data_type=dt.FLOAT, name="descale")
        tensors = {"image": x, "weight": f, "descale": d}
        if call.bias is not None:
            tensors["bias"] = graph.tensor(name="bias", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=io)
            y = graph.bias(input=y, bias=tensors["bias"], compute_data_type=dt.FLOAT, name="bias")
        y.set_output(True)
        y.set_data_type(io)
        tensors["output"] = y
        return graph, tensors

    def pack(self, tensors: dict[str, Any], call: _Convolution, out: torch.Tensor) -> dict[Any, torch.Tensor]:
        pack = {
            tensors["image"]: call.image,
            tensors["weight"]: call.weight,
            tensors["descale"]: call.descale,
            tensors["output"]: out,
        }
        if call.bias is not None:
            pack[tensors["bias"]] = call.bias
        return pack


_CUDNN = shared(_CudnnFp8Convolutions())
