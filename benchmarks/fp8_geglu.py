"""The SDXL base UNet's feed-forward first halves, one shape at a time: cuBLAS fp8 matmul + inductor's GEGLU kernel
(today's static fp8) against engine/fp8_geglu_kernel.py's fused Triton kernel, on a GPU.

Why: the fused kernel saves writing and re-reading the [M, 2N] bf16 product (engine/fp8_geglu.py says how much),
but it is a Triton matmul against cuBLAS's (run 58 also measured a version with plain loads: 5-7 % slower): it
pays only if it keeps within ~20 % of cuBLAS's matmul time. Both paths start from the same e4m3 rows and end in
the e4m3 input of the second linear; the unfused one is compiled (one graph: the matmul, then one fused pointwise
kernel), as in the engine. Each figure is the median time of one call replayed in a CUDA graph
(triton.testing.do_bench_cudagraph), as the engine's UNets run: no host time in it (run 57's first figures, timed
call by call with the host's dispatch included, overstated both paths by 0.1-0.2 ms). The per-call totals weight
each shape by how often one base UNet call runs it. Agreement: the fraction of the fused output's e4m3 values
equal to the unfused one's, and the relative L2 of the difference after dequantizing (the unfused path rounds the
product to bf16 first; the fused one does not).

`--cold`: each replayed call takes the next of several copies of its operands, together larger than the card's
L2 cache (50 MB on an H200), as in a UNet call, where each feed-forward's weights and input come from memory.
Without it the same operands are read call after call and stay in L2: why run 58's 14.5 ms saved a base call
showed up as ~2-3 ms in the engine (runs 59-60) is the question it asks.

    python3 benchmarks/fp8_geglu.py --batches 16,2 [--cold] --out results.json
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import torch
import torch.nn.functional as F
import triton.testing
from fp8_gemm import print_per_call_totals, record_batch, unet_batch_parser

from imagesmith.engine import fp8_geglu_kernel
from imagesmith.engine.fp8 import CALIBRATION_HEADROOM, E4M3_MAX, e4m3_scales, to_e4m3
from imagesmith.engine.fp8_geglu import fp8_geglu

# (label, tokens per image, in_features D, GEGLU width N, feed-forwards per base UNet call): 10 transformer blocks
# at width 640 (64x64 tokens), 60 at 1280 (32x32), as in fp8_gemm.SHAPES.
SHAPES: tuple[tuple[str, int, int, int, int], ...] = (
    ("640 ff", 4096, 640, 2560, 10),
    ("1280 ff", 1024, 1280, 5120, 60),
)
METHODS = ("cuBLAS matmul alone", "unfused (compiled)", "fused (Triton)")


def graph_ms(fn: Any) -> float:
    """Median ms of one call, replayed in a CUDA graph; the warm-up calls compile and autotune first."""
    fn()
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def unfused(
    x: torch.Tensor,
    w_t: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """Today's path: cuBLAS's fp8 matmul with the bias in its epilogue, bf16 out; then GEGLU and the cast."""
    product = torch._scaled_mm(
        x, w_t, scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
    )
    value, gate = product.chunk(2, dim=-1)
    return to_e4m3(value * F.gelu(gate), out_scale)


L2_BYTES = 50 * 2**20  # an H200's L2 cache


def measure_shape(rows: int, k: int, n: int, compiled: Any, cold: bool) -> dict[str, Any]:
    activations = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    bias = torch.randn(2 * n, device="cuda", dtype=torch.bfloat16) * 0.1
    x_scale, w_scale = e4m3_scales(activations, False), e4m3_scales(weight, False)
    x, w = to_e4m3(activations, x_scale), to_e4m3(weight, w_scale)
    product = torch._scaled_mm(
        x, w.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
    )
    value, gate = product.float().chunk(2, dim=-1)
    out_scale = (value * F.gelu(gate)).abs().amax().reshape(1, 1) * CALIBRATION_HEADROOM / E4M3_MAX
    descale = (x_scale * w_scale).reshape(1)
    # Enough copies of the operands that the ones a call reads were evicted from L2 since their last use.
    copies = 2 + 2 * L2_BYTES // (x.numel() + w.numel()) if cold else 1
    operands = [(x.clone(), w.clone()) for _ in range(copies)]
    turn = itertools.count()

    def next_operands() -> tuple[torch.Tensor, torch.Tensor]:
        return operands[next(turn) % copies]  # at capture: each replayed call gets its own copy

    def matmul_alone() -> torch.Tensor:
        a, b = next_operands()
        return torch._scaled_mm(
            a,
            b.t(),
            scale_a=x_scale,
            scale_b=w_scale,
            bias=bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )

    def unfused_call() -> torch.Tensor:
        a, b = next_operands()
        return compiled(a, b.t(), x_scale, w_scale, bias, out_scale)

    def fused_call() -> torch.Tensor:
        a, b = next_operands()
        return fp8_geglu(a, b, descale, bias, out_scale.reshape(1))

    row: dict[str, Any] = {
        "copies": copies,
        "cuBLAS matmul alone": graph_ms(matmul_alone),
        "unfused (compiled)": graph_ms(unfused_call),
        "fused (Triton)": graph_ms(fused_call),
    }
    row["tuned"] = str(getattr(fp8_geglu_kernel._fp8_geglu_kernel, "best_config", "?"))
    reference = compiled(x, w.t(), x_scale, w_scale, bias, out_scale).float()
    fused = fp8_geglu(x, w, descale, bias, out_scale.reshape(1)).float()
    row["equal_fraction"] = float((reference == fused).float().mean())
    row["relative_l2"] = float((fused - reference).norm() / reference.norm())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = unet_batch_parser(__doc__)
    parser.add_argument("--cold", action="store_true", help="operands from memory, not from L2 (see above)")
    args = parser.parse_args(argv)
    compiled = torch.compile(unfused)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cold": args.cold,
        "batches": {},
    }
    for batch in (int(b) for b in args.batches.split(",")):
        rows: dict[str, dict[str, Any]] = {}
        for label, tokens, k, n, count in SHAPES:
            m = batch * tokens
            row = {"rows": m, "k": k, "n": n, "count": count}
            row.update(measure_shape(m, k, n, compiled, args.cold))
            rows[label] = row
            tflops = 2 * m * k * 2 * n / 1e9
            print(
                f"batch {batch:2d} {label:8s} "
                + " | ".join(
                    f"{name} {row[name]:.3f} ms ({tflops / row[name]:.0f} TFLOP/s)" for name in METHODS
                )
                + f" | e4m3 equal {row['equal_fraction']:.3f}, rel L2 {row['relative_l2']:.2e} | {row['tuned']}",
                flush=True,
            )
        record_batch(report, batch, rows, METHODS, args.out)
    print_per_call_totals(report, "ms per base UNet call, summed over its 70 feed-forwards' first halves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
