"""Does one batch size's fastest cuDNN plan serve the others? The fp8 convolutions' plan choice by name, per batch.

Why: the service's warm-up meets every UNet batch from 1 to batch_max (for its CUDA graphs), and choosing a shape's
plan costs ~2 s (run 53: 52.5 s for 25 shapes at one batch), so fp8 convolutions could add ~20 minutes to a first
start at batch_max 8. A plan index means nothing across batch sizes (each is its own graph, with its own list), but
a plan's name (engine and knobs) does: if the fastest name at one batch is (nearly) the fastest at the others, a
shape could time its plans once and build only that name at every other batch.

Runs the engine's own op (engine/fp8_conv.py) on each base UNet convolution shape at each batch, then prints, per
shape, the fastest plan's name per batch and what the largest batch's choice costs at each other batch (its time
over that batch's fastest).

    PYTHONPATH=src python3 benchmarks/fp8_conv_plan_names.py --batches 16,8,2 --out names.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from fp8_conv import BASE_SHAPES
from torch import nn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batches", default="16,8,2", help="UNet batches, the first the one whose choice is kept"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from imagesmith.engine import cudnn_graphs
    from imagesmith.engine.cudnn_graphs import plan_reports
    from imagesmith.engine.fp8_conv import Float8Conv2d

    # Every batch size timed in full: this measures what the engine's reuse by name (built on run 56) assumes.
    cudnn_graphs.REUSE_WITHIN = 1.0

    batches = [int(b) for b in args.batches.split(",")]
    rows: dict[str, Any] = {}
    for c_in, c_out, kernel, stride, size, _count in BASE_SHAPES:
        label = f"{c_in}->{c_out} k{kernel} s{stride} @{size}"
        layer = Float8Conv2d(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2).cuda().bfloat16())
        by_batch = {}
        for batch in batches:
            x = torch.randn(batch, c_in, size, size, device="cuda", dtype=torch.bfloat16)
            before = len(plan_reports())
            with torch.no_grad():
                layer(x.contiguous(memory_format=torch.channels_last))
            [report] = plan_reports()[before:]
            by_batch[batch] = {
                "fastest": report["name"],
                "plans_ms": report["plans_ms"],
                "s": report["seconds"],
            }
        kept = by_batch[batches[0]]["fastest"]
        for data in by_batch.values():
            times = data["plans_ms"]
            data["kept_over_fastest"] = times[kept] / min(times.values()) if kept in times else None
        rows[label] = by_batch
        print(
            f"{label:26s} "
            + " | ".join(
                f"b{b}: {d['fastest']} ({d['s']:.1f} s), kept x{d['kept_over_fastest'] or float('nan'):.3f}"
                for b, d in by_batch.items()
            ),
            flush=True,
        )
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    for batch in batches[1:]:
        ratios = [r[batch]["kept_over_fastest"] for r in rows.values() if r[batch]["kept_over_fastest"]]
        same = sum(r[batch]["fastest"] == r[batches[0]]["fastest"] for r in rows.values())
        print(
            f"batch {batch}: the same fastest name as batch {batches[0]} on {same} of {len(rows)} shapes; keeping "
            f"batch {batches[0]}'s costs x{max(ratios):.3f} at worst, x{sum(ratios) / len(ratios):.3f} on average"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
