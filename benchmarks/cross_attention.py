"""The UNets' cross-attention (77 prompt keys) as cuDNN's fused kernel against plain matmuls and a softmax, each
timed as the compiled UNet runs it: many calls back to back inside one CUDA graph, so launch costs are gone.

Why: every compiled call's attention is cuDNN's flash kernel (runs 19-22: the fastest torch ships for SDXL's
self-attention). A base call holds 70 cross-attentions, a refiner call 44, each against only 77 keys. There the
flash kernel has one short block of keys to stream, the microbenchmark's launch-bound rate was 27-50 TFLOP/s
(run 80), and each call also queues a memset (run 91). Written out, the same attention is a batched matmul
(scores: queries x 77), a softmax that inductor fuses into one Triton kernel, and a second batched matmul: the
shape the VAE decoder's attention gained from (run 80, `IMAGESMITH_DECODER_MATH_ATTENTION`). Which is faster in a
CUDA graph decides whether the UNets' cross-attention should be routed the same way.

    python3 benchmarks/cross_attention.py --out results.json [--reps 50] [--replays 20] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PROMPT_KEYS = 77
HEAD_DIM = 64
# (UNet, batch with guidance, heads, queries) of each cross-attention shape at 1024x1024, with its calls per
# UNet call (run 91's profile): the base UNet's levels of 640 and 1280 channels, the refiner's of 768 and 1536
# (two levels of 1536).
SHAPES = (
    ("base", 2, 10, 4096, 10),
    ("base", 2, 20, 1024, 60),
    ("refiner", 2, 12, 4096, 20),
    ("refiner", 2, 24, 1024, 20),
    ("refiner", 2, 24, 256, 4),
)
SMOKE_SHAPES = (("base", 2, 2, 64, 2), ("refiner", 2, 3, 16, 3))


def written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention as two batched matmuls and a softmax (what inductor compiles into cuBLAS calls and one fused
    Triton softmax), in engine/decoder_attention.py's form: q and k each scaled by head_dim^-1/4. Not the
    textbook form (scores times head_dim^-1/2): inductor's fuse_attention pass matches that one and turns it back
    into scaled_dot_product_attention, so run 92 timed cuDNN twice (identical times and errors)."""
    root_scale = q.shape[-1] ** -0.25
    scores = (q * root_scale) @ (k * root_scale).transpose(-1, -2)
    return scores.softmax(dim=-1) @ v


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's default attention: on Hopper with cuDNN 9.15 or newer, cuDNN's flash kernel."""
    return F.scaled_dot_product_attention(q, k, v)


def graphed_ms(fn: Callable[[], object], reps: int, replays: int) -> list[float]:
    """Milliseconds a call, from CUDA graphs of `reps` calls back to back, each replay timed with CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up off the capture: cuBLAS handles, cuDNN plans, Triton's first launch
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / reps)
    return samples


def add_graph_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that times kernels with graphed_ms (this one, attention_fa4.py)."""
    parser.add_argument("--out", required=True)
    parser.add_argument("--reps", type=int, default=50, help="calls captured back to back in one CUDA graph")
    parser.add_argument("--replays", type=int, default=20, help="timed replays of that graph")


def graph_timing(times: list[float], tflop: float, calls: int) -> dict[str, Any]:
    """graphed_ms's samples as a row's figures: a call's median and range in us, its rate, a UNet call's ms."""
    per_call_us = statistics.median(times) * 1e3
    return {
        "us_per_call": round(per_call_us, 2),
        "us_range": [round(min(times) * 1e3, 2), round(max(times) * 1e3, 2)],
        "tflop_s": round(tflop / (per_call_us / 1e6)),
        "ms_per_unet_call": round(per_call_us * calls / 1e3, 3),
    }


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """To three significant digits."""
    value = float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
    return float(f"{value:.3g}")


def measure_shape(
    shape: tuple[str, int, int, int, int], device: str, dtype: torch.dtype, reps: int, replays: int
) -> dict[str, Any]:
    unet, batch, heads, queries, calls = shape
    torch.manual_seed(0)
    q = torch.randn(batch, heads, queries, HEAD_DIM, device=device, dtype=dtype)
    k, v = (torch.randn(batch, heads, PROMPT_KEYS, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
    compiled = torch.compile(written_out, fullgraph=True, dynamic=False)
    reference = written_out(q.double(), k.double(), v.double())
    row: dict[str, Any] = {
        "unet": unet,
        "shape": f"{batch} x {heads} x {queries} x {PROMPT_KEYS}",
        "calls_per_unet_call": calls,
        "tflop": round(4 * batch * heads * queries * PROMPT_KEYS * HEAD_DIM / 1e12, 6),
    }
    variants: dict[str, Callable[..., torch.Tensor]] = {
        "fused (cuDNN)": fused,
        "written out, compiled": compiled,
    }
    from torch._dynamo.utils import counters

    replaced_before = counters["inductor"]["fuse_attention"]
    for name, attention in variants.items():
        entry: dict[str, Any] = {"rel_l2_vs_fp64": relative_l2(attention(q, k, v), reference)}
        if attention is compiled:
            # Whether inductor turned the matmuls back into one attention call (run 92's form did): 0 wanted.
            entry["attention_patterns_replaced"] = counters["inductor"]["fuse_attention"] - replaced_before
        if device == "cuda":
            times = graphed_ms(lambda: attention(q, k, v), reps, replays)  # noqa: B023  (used before the next)
            entry.update(graph_timing(times, row["tflop"], calls))
        row[name] = entry
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_graph_timing_arguments(parser)
    parser.add_argument(
        "--smoke", action="store_true", help="toy shapes on the CPU, fp32: proves the code path"
    )
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "rows": [],
    }
    for shape in SMOKE_SHAPES if args.smoke else SHAPES:
        results["rows"].append(measure_shape(shape, device, dtype, args.reps, args.replays))
        Path(args.out).write_text(json.dumps(results, indent=1))
    if device == "cuda":
        print(f"\n{results['gpu']}, torch {results['torch']}; cross-attention, head dim 64, 77 keys")
        print(
            "| UNet | shape | calls | cuDNN us (TFLOP/s) | written out us (TFLOP/s) | ms a UNet call: cuDNN / out |"
        )
        print("|---|---|---|---|---|---|")
        for row in results["rows"]:
            a, b = row["fused (cuDNN)"], row["written out, compiled"]
            print(
                f"| {row['unet']} | {row['shape']} | {row['calls_per_unet_call']} | {a['us_per_call']} ({a['tflop_s']})"
                f" | {b['us_per_call']} ({b['tflop_s']}) | {a['ms_per_unet_call']} / {b['ms_per_unet_call']} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
