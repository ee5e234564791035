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
the custom op hides 49 of 51; engine/fast.py now forces the layout with fp8 convolutions (not yet measured).

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
  shape's plans are timed once, on its first call, and the fastest is kept, and remembered beside the compile
  cache (engine/fp8_conv_plans.py) so that a restart builds only that plan. A first call never happens inside a
  CUDA-graph capture: torch's CUDA-graph trees run every new shape eagerly first, and Engine.start calibrates
  the scales (eager) before anything compiles.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagesmith.engine.fp8 import Fp8Layer, e4m3_scales, replace_modules, to_e4m3
from imagesmith.engine.fp8_conv_plans import FILE_NAME, PlanChoices, plan_key

log = logging.getLogger(__name__)

# Plans tried per shape when choosing the fastest: cuDNN offered 11 for each SDXL shape in run 51, and the fastest
# of the 8 timed there was often the 7th. Building one takes a moment at start-up.
PLANS_TRIED = 12
_TIMING_REPEATS = 5


def cudnn_frontend_available() -> bool:
    """Whether `import cudnn` (nvidia-cudnn-frontend) would work; it is an optional dependency."""
    import importlib.util

    return importlib.util.find_spec("cudnn") is not None


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


@dataclass
class _ShapeGraph:
    """One shape's cuDNN graph, its tensors' handles, the plan chosen and the workspace it needs."""

    graph: Any
    image: Any
    weight: Any
    descale: Any
    bias: Any | None
    output: Any
    plan: int
    workspace_bytes: int


class _CudnnFp8Convolutions:
    """cuDNN graphs for fp8 convolutions, one per shape, built and timed on first use; one handle per GPU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, Any] = {}
        self._graphs: dict[tuple[object, ...], _ShapeGraph] = {}
        self._cudnn: Any = None
        self.choices = PlanChoices(None)
        # One entry per graph built: what choosing its plan cost and chose (benchmarks read it; run 52's first
        # call was 135 s longer and nothing said where the time went).
        self.reports: list[dict[str, Any]] = []

    def _module(self) -> Any:
        if self._cudnn is None:
            try:
                import cudnn  # nvidia-cudnn-frontend, optional
            except ImportError as error:
                raise RuntimeError(
                    "IMAGESMITH_FP8_CONVS needs NVIDIA's cuDNN frontend: pip install nvidia-cudnn-frontend"
                ) from error
            self._cudnn = cudnn
        return self._cudnn

    def _handle(self, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._handles:
            with torch.cuda.device(index):
                self._handles[index] = self._module().create_handle()
        return self._handles[index]

    def run(self, call: _Convolution) -> torch.Tensor:
        key = (call.image.device, *call.shape_key)
        with self._lock:
            handle = self._handle(call.image.device)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._build(handle, call)
        out = call.new_output()
        self._execute(handle, entry, call, out, entry.plan)
        return out

    def _execute(
        self, handle: Any, entry: _ShapeGraph, call: _Convolution, out: torch.Tensor, plan: int
    ) -> None:
        cudnn = self._module()
        # torch's allocator gives the workspace, so inside a CUDA-graph capture it comes from the graph's pool.
        workspace = torch.empty(max(entry.workspace_bytes, 1), device=call.image.device, dtype=torch.uint8)
        pack: dict[Any, torch.Tensor] = {
            entry.image: call.image,
            entry.weight: call.weight,
            entry.descale: call.descale,
            entry.output: out,
        }
        if entry.bias is not None and call.bias is not None:
            pack[entry.bias] = call.bias
        # The handle runs on whatever stream torch is on now (the engine's, or a capture's).
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(call.image.device).cuda_stream)
        entry.graph.execute_plan_at_index(pack, workspace, plan, handle=handle)

    def _build(self, handle: Any, call: _Convolution) -> _ShapeGraph:
        cudnn = self._module()
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
        b = None
        if call.bias is not None:
            b = graph.tensor(name="bias", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=io)
            y = graph.bias(input=y, bias=b, compute_data_type=dt.FLOAT, name="bias")
        y.set_output(True)
        y.set_data_type(io)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        key = plan_key(torch.cuda.get_device_name(call.image.device), cudnn.backend_version(), call.shape_key)
        began = time.perf_counter()
        remembered = self.choices.get(key)
        if remembered is not None:
            try:
                graph.build_plan_at_index(remembered)
                workspace = graph.get_workspace_size_plan_at_index(remembered)
                log.info("fp8 convolution %s: plan %d, remembered", key, remembered)
                self._report(graph, key, remembered, [remembered], {}, began, remembered=True)
                return _ShapeGraph(graph, x, f, d, b, y, remembered, workspace)
            except Exception as error:  # another build of cuDNN, say: choose again
                log.warning("fp8 convolution %s: remembered plan %d not built (%s)", key, remembered, error)
        built: list[int] = []
        for index in range(min(graph.get_execution_plan_count(), PLANS_TRIED)):
            try:
                graph.build_plan_at_index(index)
                built.append(index)
            except Exception:  # an engine that cannot take this shape: the next one may
                continue
        if not built:
            raise RuntimeError(f"cuDNN built no fp8 convolution plan for {key}")
        entry = _ShapeGraph(
            graph, x, f, d, b, y, built[0], max(graph.get_workspace_size_plan_at_index(i) for i in built)
        )
        timings: dict[int, float] = {}
        if not torch.cuda.is_current_stream_capturing():  # timing synchronises: never inside a capture
            if len(built) > 1:
                timings = self._time_plans(handle, entry, built, call)
                entry.plan = min(timings, key=timings.__getitem__)
            self.choices.remember(key, entry.plan)
        log.info("fp8 convolution %s: plan %d, the fastest of %d built", key, entry.plan, len(built))
        self._report(graph, key, entry.plan, built, timings, began, remembered=False)
        return entry

    def _report(
        self,
        graph: Any,
        key: str,
        plan: int,
        built: list[int],
        timings: dict[int, float],
        began: float,
        remembered: bool,
    ) -> None:
        # Plan names (engine and knobs) say whether a choice could carry across batch sizes, where indices cannot.
        names = {index: str(graph.get_plan_name_at_index(index)) for index in built}
        self.reports.append(
            {
                "key": key,
                "plan": plan,
                "name": names[plan],
                "remembered": remembered,
                "seconds": round(time.perf_counter() - began, 3),
                "plans_ms": {names[index]: round(ms / _TIMING_REPEATS, 4) for index, ms in timings.items()},
            }
        )

    def _time_plans(
        self, handle: Any, entry: _ShapeGraph, plans: list[int], call: _Convolution
    ) -> dict[int, float]:
        """Each plan's time on this call's own operands in ms for _TIMING_REPEATS calls (CUDA events; one warm-up
        call each)."""
        out = call.new_output()
        timings = {}
        for plan in plans:
            self._execute(handle, entry, call, out, plan)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(_TIMING_REPEATS):
                self._execute(handle, entry, call, out, plan)
            end.record()
            end.synchronize()
            timings[plan] = start.elapsed_time(end)
        return timings


_CUDNN = _CudnnFp8Convolutions()


def plan_reports() -> list[dict[str, Any]]:
    """Every cuDNN graph built in this process so far: its key, the plan it runs, and what choosing it cost."""
    return list(_CUDNN.reports)


def remember_plans_in(folder: Path) -> None:
    """Keep the chosen cuDNN plans in `folder` (the compile cache's root) from now on."""
    path = folder / FILE_NAME
    if _CUDNN.choices.path != path:
        _CUDNN.choices = PlanChoices(path)
