"""The fused bf16 GEGLU kernel's tile configs one by one, at each SDXL feed-forward shape, on a GPU: which config
is fastest where, against cuBLAS's plain matmul of the same shape.

Why: the kernel's autotuner picks among a handful of configs; this times each candidate alone at each shape
(operands cold, each replayed call reading copies evicted from L2, in CUDA graphs, as bf16_geglu.py does) and sums
the per-UNet-call time of each and of the best per shape. Run 100 (H100): the engine's configs hold the best
(128x128x64, 3 or 4 stages); a persistent launch (in git at 54c74dd) was 7-9 % faster here, yet gained nothing in
the engine (run 101), so a figure from here is a candidate for the engine's A/B, not a result.

    python3 benchmarks/bf16_geglu_tiles.py --out tiles.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
from bf16_geglu import L2_BYTES, SHAPES, gpu_report_header, graph_ms

from imagesmith.engine import bf16_geglu_kernel
from imagesmith.engine.bf16_geglu import bf16_geglu, interleave_halves
from imagesmith.engine.tma_tiles import tma_configs

# (BLOCK_M, BLOCK_N output columns, BLOCK_K, warps, stages). The weight's tile is 2 x BLOCK_N rows (value and
# gate interleaved), so BLOCK_N 128 is wgmma's widest N (256). Shared memory a stage: (BLOCK_M + 2 BLOCK_N) x
# BLOCK_K x 2 bytes; configs past an H100's 227 KiB fail to compile and are reported as such.
TILES = [
    *bf16_geglu_kernel._TILES,  # the engine's autotuner's
    (128, 128, 128, 8, 2),
    (128, 64, 128, 4, 3),
    (128, 64, 128, 8, 3),
    (64, 128, 128, 4, 2),
    (256, 64, 64, 8, 3),
    (256, 64, 64, 8, 4),
]


def candidates() -> dict[str, Any]:
    """The kernel at each tile config, as an autotuner of one config (so its pre-hook sets the descriptors'
    blocks and nothing is tuned)."""
    found = {}
    for tile in TILES:
        label = f"{'x'.join(map(str, tile[:3]))} w{tile[3]} s{tile[4]}"
        configs = tma_configs([tile], weight_rows_per_column=2)
        found[label] = triton.autotune(configs=configs, key=["M", "N", "K"])(
            bf16_geglu_kernel._bf16_geglu_kernel.fn
        )
    return found


def time_shape(rows: int, k: int, n: int, kernels: dict[str, Any]) -> dict[str, Any]:
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    bias = torch.randn(2 * n, device="cuda", dtype=torch.bfloat16) * 0.1
    woven, woven_bias = interleave_halves(weight), interleave_halves(bias)
    copies = 2 + 2 * L2_BYTES // (2 * (x.numel() + weight.numel()))
    operands = [(x.clone(), weight.clone(), woven.clone()) for _ in range(copies)]
    turn = itertools.count()
    reference = bf16_geglu(x.float(), woven.float(), woven_bias.float())  # the op's fp32 path, on the GPU

    def next_operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return operands[next(turn) % copies]

    row: dict[str, Any] = {"cuBLAS matmul alone": graph_ms(lambda: F.linear(*next_operands()[:2], bias))}
    for label, kernel in kernels.items():

        def call(kernel: Any = kernel) -> torch.Tensor:
            a, _, w = next_operands()
            return bf16_geglu_kernel.bf16_geglu_cuda(a, w, woven_bias, kernel=kernel)

        try:
            got = bf16_geglu_kernel.bf16_geglu_cuda(x, woven, woven_bias, kernel=kernel).float()
            error = float((got - reference).norm() / reference.norm())
            row[label] = {"ms": graph_ms(call), "relative_l2": error}
        except Exception as failure:  # out of shared memory, a compile error: this config cannot run here
            row[label] = {"error": f"{type(failure).__name__}: {str(failure).strip().splitlines()[0][:160]}"}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2, help="the UNet's batch (images x 2 for guidance)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    kernels = candidates()
    report: dict[str, Any] = {**gpu_report_header(), "shapes": {}}
    per_call: dict[str, dict[str, float]] = {}
    for unet, shapes in SHAPES.items():
        totals: dict[str, float] = {}
        best_total = 0.0
        for label, tokens, k, n, count in shapes:
            started = time.monotonic()
            rows = args.batch * tokens
            row = time_shape(rows, k, n, kernels)
            report["shapes"][f"{unet} {label}"] = {"rows": rows, "k": k, "n": n, "count": count, **row}
            flops = 2 * rows * k * 2 * n / 1e9
            timed = {name: r["ms"] for name, r in row.items() if isinstance(r, dict) and "ms" in r}
            best = min(timed, key=timed.__getitem__)
            best_total += timed[best] * count
            for name, ms in {"cuBLAS matmul alone": row["cuBLAS matmul alone"], **timed}.items():
                totals[name] = totals.get(name, 0.0) + ms * count
            print(
                f"\n{unet} {label} (M {rows}, K {k}, N {n}), {time.monotonic() - started:.0f} s", flush=True
            )
            print(
                f"  cuBLAS matmul alone {row['cuBLAS matmul alone']:.4f} ms ({flops / row['cuBLAS matmul alone']:.0f})"
            )
            for name in sorted(timed, key=timed.__getitem__):
                print(
                    f"  {name:34s} {timed[name]:.4f} ms ({flops / timed[name]:.0f} TFLOP/s) l2 {row[name]['relative_l2']:.1e}"
                )
            for name, r in row.items():
                if isinstance(r, dict) and "error" in r:
                    print(f"  {name:34s} {r['error']}")
        totals["best config per shape"] = best_total
        per_call[unet] = totals
        if args.out:
            args.out.write_text(json.dumps({**report, "per_unet_call_ms": per_call}, indent=2))
    print("\n| candidate | " + " | ".join(f"{u} ms a call" for u in per_call) + " |\n|---|---|---|")
    names = sorted(per_call["base"], key=per_call["base"].__getitem__)  # fastest first
    for name in names:
        print(
            f"| {name} | " + " | ".join(f"{per_call[u].get(name, float('nan')):.3f}" for u in per_call) + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
