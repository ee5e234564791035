"""SDXL's convolutions one shape at a time: bf16 (cuDNN through torch) against fp8 through cuDNN's graph API.

Why: with the transformer linears in fp8 (engine/fp8.py) the MLPerf batch runs at 1.92 images/s, 4 % short of
2.0; a static-fp8 base UNet call at batch 16 takes ~187 ms, and its 3x3 convolutions (26 TFLOP a call) are the
largest block of bf16 work left. torch has no fp8 convolution, but cuDNN has one on Hopper (e4m3 image and filter,
fp32 accumulation), reachable through cuDNN's frontend (`pip install nvidia-cudnn-frontend`, which loads the
libcudnn torch already loaded). Before any engine code: does it beat bf16 on SDXL's shapes, by how much, can
its epilogue take the dequantizing scale and the bias and write bf16 (so nothing else touches the output), and
does it replay inside a CUDA graph (the engine's `reduce-overhead` mode)?

Per shape: bf16 `F.conv2d` on channels-last tensors (what the compiled UNet runs; cuDNN's own timing off, as
under the UNets' CUDA graphs, and on), then fp8 with cuDNN's heuristic plan and with the fastest of its plans
(timed here: what an engine would pick at warm-up). Fidelity: relative L2 of the fp8 output against bf16's on
the same dequantized operands (the kernel alone) and against bf16 on the original operands (with the rounding
to e4m3). Each figure is the median of CUDA-event timings over `--repeats` calls.

    python3 benchmarks/fp8_conv.py --batches 16,2 --out results.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from fp8_gemm import (
    cudnn_report,
    print_per_call_totals,
    quantize_tensorwise,
    record_batch,
    time_ms,
    unet_batch_parser,
)

# (in channels, out channels, kernel, stride, input height = width, calls per UNet call), from a forward of the
# full-size UNets (benchmarks/sdxl-architecture.json) on the meta device with hooks on every Conv2d, 1024x1024
# images (128x128 latents). conv_in (4 channels in) and conv_out (4 out) stay bf16: too few channels for fp8.
BASE_SHAPES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (320, 320, 3, 1, 128, 7),
    (320, 320, 3, 2, 128, 1),
    (640, 640, 3, 1, 128, 1),
    (960, 320, 3, 1, 128, 1),
    (960, 320, 1, 1, 128, 1),
    (640, 320, 3, 1, 128, 2),
    (640, 320, 1, 1, 128, 2),
    (320, 640, 3, 1, 64, 1),
    (640, 640, 3, 1, 64, 6),
    (320, 640, 1, 1, 64, 1),
    (640, 640, 3, 2, 64, 1),
    (1280, 1280, 3, 1, 64, 1),
    (1920, 640, 3, 1, 64, 1),
    (1920, 640, 1, 1, 64, 1),
    (1280, 640, 3, 1, 64, 1),
    (1280, 640, 1, 1, 64, 1),
    (960, 640, 3, 1, 64, 1),
    (960, 640, 1, 1, 64, 1),
    (640, 1280, 3, 1, 32, 1),
    (1280, 1280, 3, 1, 32, 10),
    (640, 1280, 1, 1, 32, 1),
    (2560, 1280, 3, 1, 32, 2),
    (2560, 1280, 1, 1, 32, 2),
    (1920, 1280, 3, 1, 32, 1),
    (1920, 1280, 1, 1, 32, 1),
)


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-12))


class CudnnFp8Conv:
    """One fp8 convolution as a cuDNN graph: e4m3 image (NHWC) and filter (KRSC), fp32 accumulation, then in the
    epilogue x descale (the two operands' scales, one fp32 number) + bias, written as bf16 NHWC."""

    def __init__(
        self,
        cudnn: Any,
        handle: Any,
        n: int,
        c: int,
        k: int,
        kernel: int,
        stride: int,
        hw: int,
        max_plans: int,
    ) -> None:
        self.cudnn = cudnn
        self.handle = handle
        ho = hw // stride
        pad = kernel // 2
        dt = cudnn.data_type
        graph = cudnn.pygraph(
            io_data_type=dt.BFLOAT16,
            intermediate_data_type=dt.FLOAT,
            compute_data_type=dt.FLOAT,
            handle=handle,
        )
        self.x = graph.tensor(
            name="x", dim=[n, c, hw, hw], stride=[hw * hw * c, 1, hw * c, c], data_type=dt.FP8_E4M3
        )
        self.w = graph.tensor(
            name="w",
            dim=[k, c, kernel, kernel],
            stride=[kernel * kernel * c, 1, kernel * c, c],
            data_type=dt.FP8_E4M3,
        )
        self.descale = graph.tensor(name="descale", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)
        self.bias = graph.tensor(name="bias", dim=[1, k, 1, 1], stride=[k, 1, k, k], data_type=dt.BFLOAT16)
        conv = graph.conv_fprop(
            image=self.x,
            weight=self.w,
            padding=[pad, pad],
            stride=[stride, stride],
            dilation=[1, 1],
            compute_data_type=dt.FLOAT,
            name="conv",
        )
        scaled = graph.mul(a=conv, b=self.descale, compute_data_type=dt.FLOAT, name="descale")
        self.y = graph.bias(input=scaled, bias=self.bias, compute_data_type=dt.FLOAT, name="bias")
        self.y.set_output(True)
        self.y.set_data_type(dt.BFLOAT16)
        self.y_shape = (n, ho, ho, k)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        # Plans in the heuristic's order; some engines compile their kernel at build time (seconds), so only
        # the first max_plans are built. The first that builds is "the heuristic's plan".
        self.graph = graph
        self.candidates = graph.get_execution_plan_count()
        self.built: list[int] = []
        for index in range(min(self.candidates, max_plans)):
            try:
                graph.build_plan_at_index(index)
                self.built.append(index)
            except Exception as error:
                print(f"  plan {index} not built: {str(error).splitlines()[0][:120]}", flush=True)
        if not self.built:
            raise RuntimeError(f"none of {self.candidates} plans built")
        self.workspace = torch.empty(
            max(graph.get_workspace_size_plan_at_index(i) for i in self.built),
            device="cuda",
            dtype=torch.uint8,
        )

    def runner(
        self, x: torch.Tensor, w: torch.Tensor, descale: torch.Tensor, bias: torch.Tensor, plan: int
    ) -> Callable[[], torch.Tensor]:
        out = torch.empty(self.y_shape, device="cuda", dtype=torch.bfloat16)
        pack = {self.x: x, self.w: w, self.descale: descale, self.bias: bias, self.y: out}

        def call() -> torch.Tensor:
            self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
            self.graph.execute_plan_at_index(pack, self.workspace, plan, handle=self.handle)
            return out

        return call


def measure_shape(
    cudnn: Any, handle: Any, batch: int, shape: tuple[int, ...], repeats: int, max_plans: int
) -> dict[str, Any]:
    c, k, kernel, stride, hw, _ = shape
    x = torch.randn(batch, c, hw, hw, device="cuda", dtype=torch.bfloat16).to(
        memory_format=torch.channels_last
    )
    w = (torch.randn(k, c, kernel, kernel, device="cuda") / (c * kernel * kernel) ** 0.5).to(torch.bfloat16)
    w = w.to(memory_format=torch.channels_last)
    bias = torch.randn(k, device="cuda", dtype=torch.bfloat16) * 0.1
    pad = kernel // 2

    def bf16() -> torch.Tensor:
        return F.conv2d(x, w, bias, stride=stride, padding=pad)

    row: dict[str, Any] = {}
    torch.backends.cudnn.benchmark = False
    row["bf16"] = time_ms(bf16, repeats)
    torch.backends.cudnn.benchmark = True
    row["bf16 cudnn.benchmark"] = time_ms(bf16, repeats)
    torch.backends.cudnn.benchmark = False
    expected = bf16()

    # NHWC fp8 operands: x's channels-last storage is NHWC already; the filter as KRSC.
    x8, sx = quantize_tensorwise(x.permute(0, 2, 3, 1).contiguous())  # scales [1, 1]
    w8, sw = quantize_tensorwise(w.permute(0, 2, 3, 1).contiguous())
    descale = (sx * sw).reshape(1).contiguous()
    dequantized = F.conv2d(
        (x8.float() * sx).permute(0, 3, 1, 2).to(torch.bfloat16),
        (w8.float() * sw).permute(0, 3, 1, 2).to(torch.bfloat16),
        bias,
        stride=stride,
        padding=pad,
    )
    try:
        conv = CudnnFp8Conv(cudnn, handle, batch, c, k, kernel, stride, hw, max_plans)
        heuristic = conv.runner(x8, w8, descale, bias, conv.built[0])
        row["fp8 heuristic"] = time_ms(heuristic, repeats)
        out = heuristic().permute(0, 3, 1, 2)
        row["rel L2 vs bf16 of dequantized"] = relative_l2(out, dequantized)
        row["rel L2 vs bf16"] = relative_l2(out, expected)
        plan_ms = {
            index: time_ms(conv.runner(x8, w8, descale, bias, index), max(10, repeats // 3))
            for index in conv.built
        }
        row["plans"] = f"{len(conv.built)} built of {conv.candidates}"
        row["plan ms"] = plan_ms
        fastest = min(plan_ms, key=lambda index: plan_ms[index] if plan_ms[index] == plan_ms[index] else 1e9)
        row["fp8 best"] = plan_ms[fastest]
        row["fp8 best plan"] = fastest
    except Exception as error:  # cuDNN says no: an unsupported graph or shape is a result, not a crash
        print(f"  fp8 refused: {str(error).splitlines()[0][:200]}", flush=True)
        row.update({"fp8 heuristic": float("nan"), "fp8 best": float("nan")})
        return row
    # One replay inside a CUDA graph, as the engine's reduce-overhead mode would run it.
    try:
        replay = conv.runner(x8, w8, descale, bias, fastest)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            replay()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = replay()
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        reference = conv.runner(x8, w8, descale, bias, fastest)().permute(0, 3, 1, 2)
        row["cuda graph replay matches"] = bool(torch.equal(captured.permute(0, 3, 1, 2), reference))
    except Exception as error:
        row["cuda graph replay matches"] = f"failed: {str(error).splitlines()[0][:160]}"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = unet_batch_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-plans", type=int, default=12, help="cuDNN plans timed per shape")
    args = parser.parse_args(argv)
    import cudnn  # nvidia-cudnn-frontend, after torch has loaded libcudnn

    handle = cudnn.create_handle()
    report = cudnn_report(cudnn)
    methods = ("bf16", "bf16 cudnn.benchmark", "fp8 heuristic", "fp8 best")
    for batch in (int(b) for b in args.batches.split(",")):
        rows = {}
        for shape in BASE_SHAPES:
            label = f"{shape[0]}->{shape[1]} k{shape[2]} s{shape[3]} @{shape[4]}"
            row = measure_shape(cudnn, handle, batch, shape, args.repeats, args.max_plans)
            row["count"] = shape[5]
            row["tflop"] = (
                2 * batch * (shape[4] // shape[3]) ** 2 * shape[0] * shape[1] * shape[2] ** 2 / 1e12
            )
            rows[label] = row
            print(
                f"batch {batch:2d} {label:26s} x{shape[5]:2d} "
                + " | ".join(f"{m} {row[m]:.3f}" for m in methods)
                + f" | {row['tflop'] / row['bf16'] * 1e3:.0f} -> {row['tflop'] / row['fp8 best'] * 1e3:.0f} TFLOP/s"
                + f" | rel L2 {row.get('rel L2 vs bf16 of dequantized', float('nan')):.1e} (kernel)"
                + f" {row.get('rel L2 vs bf16', float('nan')):.1e} (with e4m3) | plans {row.get('plans')}"
                + f" | graph {row.get('cuda graph replay matches')}",
                flush=True,
            )
        record_batch(report, batch, rows, methods, args.out)
    print_per_call_totals(
        report, "ms per base UNet call, summed over its convolutions but conv_in and conv_out"
    )
    cudnn.destroy_handle(handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
