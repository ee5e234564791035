"""The SDXL base UNet's transformer linears, one at a time: bf16 against each fp8 recipe, on a GPU.

Why: the fp8 linears of engine/fp8.py (row-wise scales, computed per call) gave 1.66 images/s against bf16's
1.62 at the MLPerf setting (run 16), far below what fp8 tensor cores promise. This says where that went, shape
by shape, before the recipe changes: the matmul itself (row-wise vs one scale per tensor, cuBLAS's fast
accumulation on or off, the bias inside the matmul or after it) and the activation's quantization (a scale
computed per call, per row or per tensor, against a fixed scale that is only a multiply and a cast, which
inductor can fuse into the kernel that produces the activation).

Each figure is the median of CUDA-event timings over many calls on the same tensors; the per-call total weights
each shape by how often one base UNet call runs it (10 transformer blocks at width 640, 60 at 1280; see
SHAPES). Quantization kernels are timed alone, compiled: an upper bound on what they cost inside a compiled
UNet, where inductor may fuse them into their producers.

    python3 benchmarks/fp8_gemm.py --batches 16,2 --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)

# (label, tokens per image, in_features, out_features, calls per base UNet call). SDXL's transformer blocks:
# width 640 at 64x64 tokens (10 blocks, 5 transformer models), width 1280 at 32x32 tokens (60 blocks, 12
# models). Per block: fused QKV, self-attention out, cross-attention q and out (two d->d), feed-forward in (to
# 2 x 4d, GEGLU) and out (4d->d); per transformer model proj_in and proj_out (two more d->d). The cross-attention
# k and v see the 77 text tokens only: too few rows to matter, left out.
SHAPES: tuple[tuple[str, int, int, int, int], ...] = (
    ("640 qkv", 4096, 640, 1920, 10),
    ("640 d->d", 4096, 640, 640, 3 * 10 + 2 * 5),
    ("640 ff in", 4096, 640, 5120, 10),
    ("640 ff out", 4096, 2560, 640, 10),
    ("1280 qkv", 1024, 1280, 3840, 60),
    ("1280 d->d", 1024, 1280, 1280, 3 * 60 + 2 * 12),
    ("1280 ff in", 1024, 1280, 10240, 60),
    ("1280 ff out", 1024, 5120, 1280, 60),
)


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of one call, CUDA events around each of `repeats` calls after a warm-up; NaN where
    this torch or card refuses the call (printed)."""
    try:
        for _ in range(5):
            fn()
    except (RuntimeError, NotImplementedError) as error:
        print(f"  refused: {str(error).splitlines()[0][:160]}", flush=True)
        return float("nan")
    torch.cuda.synchronize()
    return statistics.median(event_times_ms(fn, repeats))


def event_times_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    """Each of `repeats` calls' milliseconds on the GPU, CUDA events around it (no warm-up)."""
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return samples


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_tensorwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax().float().clamp(min=1e-12).reshape(1, 1) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_static(x: torch.Tensor, inverse_scale: torch.Tensor) -> torch.Tensor:
    return (x * inverse_scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def measure_shape(rows: int, k: int, n: int, repeats: int) -> dict[str, float]:
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x_row, x_row_scale = quantize_rowwise(x)
    w_row, w_row_scale = quantize_rowwise(w)
    x_ten, x_ten_scale = quantize_tensorwise(x)
    w_ten, w_ten_scale = quantize_tensorwise(w)
    w_row_t, w_ten_t = w_row.t(), w_ten.t()  # column-major [k, n], as _scaled_mm wants its second operand
    w_row_scale = w_row_scale.reshape(1, -1)

    def scaled(
        a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, fast: bool, fused_bias: bool
    ):
        def call() -> torch.Tensor:
            y = torch._scaled_mm(
                a,
                b,
                scale_a=sa,
                scale_b=sb,
                bias=bias if fused_bias else None,
                out_dtype=torch.bfloat16,
                use_fast_accum=fast,
            )
            return y if fused_bias else y + bias

        return call

    results = {"bf16": time_ms(lambda: F.linear(x, w, bias), repeats)}
    results["fp8 row-wise (today)"] = time_ms(
        scaled(x_row, w_row_t, x_row_scale, w_row_scale, False, False), repeats
    )
    results["fp8 row-wise, fast accum"] = time_ms(
        scaled(x_row, w_row_t, x_row_scale, w_row_scale, True, False), repeats
    )
    results["fp8 tensor, bias after"] = time_ms(
        scaled(x_ten, w_ten_t, x_ten_scale, w_ten_scale, False, False), repeats
    )
    results["fp8 tensor, bias fused"] = time_ms(
        scaled(x_ten, w_ten_t, x_ten_scale, w_ten_scale, False, True), repeats
    )
    results["fp8 tensor, fused, fast accum"] = time_ms(
        scaled(x_ten, w_ten_t, x_ten_scale, w_ten_scale, True, True), repeats
    )
    inverse = (1 / x_ten_scale).to(torch.bfloat16)
    results["quant row-wise (compiled)"] = time_ms(lambda: COMPILED["rowwise"](x), repeats)
    results["quant tensor (compiled)"] = time_ms(lambda: COMPILED["tensorwise"](x), repeats)
    results["quant static (compiled)"] = time_ms(lambda: COMPILED["static"](x, inverse), repeats)
    return results


COMPILED: dict[str, Callable[..., Any]] = {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batches", default="16,2", help="rows per image times this: the UNet's batch (CFG doubles)"
    )
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64
    COMPILED.update(
        rowwise=torch.compile(quantize_rowwise),
        tensorwise=torch.compile(quantize_tensorwise),
        static=torch.compile(quantize_static),
    )
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batches": {},
    }
    for batch in (int(b) for b in args.batches.split(",")):
        per_shape: dict[str, dict[str, float]] = {}
        for label, tokens, k, n, count in SHAPES:
            per_shape[label] = {
                "rows": float(batch * tokens),
                "k": float(k),
                "n": float(n),
                "count": float(count),
            }
            per_shape[label].update(measure_shape(batch * tokens, k, n, args.repeats))
            row = per_shape[label]
            tflops = 2 * row["rows"] * k * n / row["bf16"] / 1e9
            print(
                f"batch {batch:2d} {label:12s} bf16 {row['bf16']:.3f} ms ({tflops:.0f} TFLOP/s) | "
                + " | ".join(
                    f"{name} {value:.3f}"
                    for name, value in row.items()
                    if isinstance(value, float) and name != "bf16"
                ),
                flush=True,
            )
        methods = [name for name in next(iter(per_shape.values())) if name not in ("rows", "k", "n", "count")]
        totals = {m: sum(row[m] * row["count"] for row in per_shape.values()) for m in methods}
        report["batches"][batch] = {"shapes": per_shape, "per_unet_call_ms": totals}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print_totals_table(
        "batch",
        {batch: data["per_unet_call_ms"] for batch, data in report["batches"].items()},
        "ms per base UNet call, summed over its transformer linears; quant rows: one activation each",
    )
    return 0


def cudnn_report(cudnn: Any) -> dict[str, Any]:
    """Print which GPU, torch and cuDNN a cuDNN microbenchmark runs on; a report holding them and no batch yet."""
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
        f"frontend {getattr(cudnn, '__version__', '?')} (backend {cudnn.backend_version()})",
        flush=True,
    )
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "batches": {},
    }


def record_batch(
    report: dict[str, Any],
    batch: int,
    rows: dict[str, dict[str, Any]],
    methods: Iterable[str],
    out: Path | None,
) -> None:
    """One batch's shapes into the report, with each method's ms per base UNet call (each shape's time x its
    calls), and the report written to `out` so far (a run cut short keeps what it measured)."""
    if rows:
        totals = {m: sum(r[m] * r["count"] for r in rows.values()) for m in methods}
        report["batches"][batch] = {"shapes": rows, "per_base_unet_call_ms": totals}
    if out:
        out.write_text(json.dumps(report, indent=2, default=str))


def unet_batch_parser(doc: str | None) -> argparse.ArgumentParser:
    """The per-shape microbenchmarks' common arguments: the UNet batches to measure and the JSON report's path."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,2", help="the UNet's batch (images x 2 for guidance)")
    parser.add_argument("--out", type=Path)
    return parser


def print_per_call_totals(report: dict[str, Any], caption: str) -> None:
    """The report's per-batch totals (record_batch's ms per base UNet call) as print_totals_table's table."""
    if report["batches"]:
        print_totals_table(
            "UNet batch",
            {batch: data["per_base_unet_call_ms"] for batch, data in report["batches"].items()},
            caption,
        )


def print_totals_table(first_column: str, totals: dict[Any, dict[str, float]], caption: str) -> None:
    """A markdown table, one row per batch of {method: ms} (the same methods in each), then its caption."""
    methods = list(next(iter(totals.values())))
    print(f"\n| {first_column} | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for batch, row in totals.items():
        print(f"| {batch} | " + " | ".join(f"{row[m]:.2f}" for m in methods) + " |")
    print(f"({caption})")


if __name__ == "__main__":
    sys.exit(main())
