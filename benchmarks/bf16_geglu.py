"""The SDXL UNets' feed-forward first halves in bf16, one shape at a time: cuBLAS matmul + inductor's GEGLU kernel
(the compiled engine today) against engine/bf16_geglu_kernel.py's fused Triton kernel, on a GPU.

Why: the fused kernel saves writing and re-reading the [M, 2N] bf16 product and one launch (1.69 ms of a base
UNet call at batch 2, run 91), but its matmul is Triton's against cuBLAS's: the fp8 version ran 22 % behind
(run 58) and kept little of its gain in the engine. It pays only if the fused time beats the unfused one here.
Run 97 (H100): 78-92 % of cuBLAS's rate; the isolated unfused GEGLU costs more than it does in the whole graph,
so the engine's A/B (fast_path.py +bgeglu, run 98: -0.5 ms a base call) is the figure that counts.
Each figure is the median time of one call replayed in a CUDA graph (triton.testing.do_bench_cudagraph), as the
engine's UNets run. "warm": the same operands every call (they stay in L2); "cold": each replayed call reads the
next of enough copies that its operands come from memory, as in a UNet call. The per-call totals weight each
shape by how often one UNet call runs it (base: 10 at 640 wide, 60 at 1280; refiner: 20 at 768, 20 at 1536 at
32x32 tokens, 4 at 1536 at 16x16). Agreement: relative L2 of the fused output against the unfused one.

    python3 benchmarks/bf16_geglu.py --batches 2,16 --out results.json
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F
import triton.testing
from fp8_gemm import print_totals_table, unet_batch_parser

from imagesmith.engine import bf16_geglu_kernel
from imagesmith.engine.bf16_geglu import bf16_geglu, interleave_halves

# (label, tokens per image at 1024x1024, in_features D, GEGLU width N, feed-forwards per UNet call)
SHAPES: dict[str, tuple[tuple[str, int, int, int, int], ...]] = {
    "base": (
        ("640 ff", 4096, 640, 2560, 10),
        ("1280 ff", 1024, 1280, 5120, 60),
    ),
    "refiner": (
        ("768 ff", 4096, 768, 3072, 20),
        ("1536 ff", 1024, 1536, 6144, 20),
        ("1536 ff mid", 256, 1536, 6144, 4),
    ),
}
METHODS = ("cuBLAS matmul alone", "unfused (compiled)", "fused (Triton)")
L2_BYTES = 50 * 2**20  # an H200's L2 cache (an H100's is 50 MB too)


def graph_ms(fn: Any) -> float:
    """Median ms of one call, replayed in a CUDA graph; the warm-up calls compile and autotune first."""
    fn()
    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def gpu_report_header() -> dict[str, str]:
    """The GPU and the versions a report's figures belong to, printed as its first line too."""
    header = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    print(f"# {header['device']}, torch {header['torch']}, triton {header['triton']}", flush=True)
    return header


def unfused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The engine's path without the fusion: diffusers' GEGLU, compiled (cuBLAS addmm, then one Triton kernel)."""
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


def measure_shape(rows: int, k: int, n: int, compiled: Any, cold: bool) -> dict[str, Any]:
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    bias = torch.randn(2 * n, device="cuda", dtype=torch.bfloat16) * 0.1
    woven, woven_bias = interleave_halves(weight), interleave_halves(bias)
    # Enough copies of the operands that the ones a call reads were evicted from L2 since their last use.
    copies = 2 + 2 * L2_BYTES // (2 * (x.numel() + weight.numel())) if cold else 1
    operands = [(x.clone(), weight.clone(), woven.clone()) for _ in range(copies)]
    turn = itertools.count()

    def next_operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return operands[next(turn) % copies]  # at capture: each replayed call gets its own copy

    def matmul_alone() -> torch.Tensor:
        a, w, _ = next_operands()
        return F.linear(a, w, bias)

    def unfused_call() -> torch.Tensor:
        a, w, _ = next_operands()
        return compiled(a, w, bias)

    def fused_call() -> torch.Tensor:
        a, _, w = next_operands()
        return bf16_geglu(a, w, woven_bias)

    row: dict[str, Any] = {
        "copies": copies,
        "cuBLAS matmul alone": graph_ms(matmul_alone),
        "unfused (compiled)": graph_ms(unfused_call),
        "fused (Triton)": graph_ms(fused_call),
    }
    row["tuned"] = str(getattr(bf16_geglu_kernel._bf16_geglu_kernel, "best_config", "?"))
    reference = compiled(x, weight, bias).float()
    fused = bf16_geglu(x, woven, woven_bias).float()
    row["relative_l2"] = float((fused - reference).norm() / reference.norm())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = unet_batch_parser(__doc__)
    parser.set_defaults(batches="2,16")
    parser.add_argument("--modes", default="warm,cold", help="warm (operands in L2), cold (from memory)")
    args = parser.parse_args(argv)
    compiled = torch.compile(unfused)
    report: dict[str, Any] = {**gpu_report_header(), "runs": {}}
    totals: dict[str, dict[str, float]] = {}
    for mode, (unet, shapes), batch in itertools.product(
        args.modes.split(","), SHAPES.items(), (int(b) for b in args.batches.split(","))
    ):
        key = f"{unet} batch {batch} {mode}"
        rows: dict[str, dict[str, Any]] = {}
        for label, tokens, k, n, count in shapes:
            m = batch * tokens
            row: dict[str, Any] = {"rows": m, "k": k, "n": n, "count": count}
            row.update(measure_shape(m, k, n, compiled, mode == "cold"))
            rows[label] = row
            tflops = 2 * m * k * 2 * n / 1e9
            print(
                f"{key:24s} {label:12s} "
                + " | ".join(
                    f"{name} {row[name]:.4f} ms ({tflops / row[name]:.0f} TFLOP/s)" for name in METHODS
                )
                + f" | rel L2 {row['relative_l2']:.2e} | {row['tuned']}",
                flush=True,
            )
        totals[key] = {m: sum(r[m] * r["count"] for r in rows.values()) for m in METHODS}
        report["runs"][key] = {"shapes": rows, "per_unet_call_ms": totals[key]}
        if args.out:
            args.out.write_text(json.dumps(report, indent=2, default=str))
    print_totals_table(
        "UNet, batch, operands", totals, "ms per UNet call, summed over its feed-forwards' first halves"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
