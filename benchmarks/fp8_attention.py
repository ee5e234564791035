"""SDXL's self-attention one shape at a time: bf16 (torch's SDPA) against fp8 through cuDNN (engine/fp8_attention.py).

Why: with the linears and convolutions in fp8 the MLPerf batch runs at 1.95 images/s (run 53), 2.6 % short of 2.0,
and self-attention (~12 TFLOP a base UNet call at batch 16) is the largest block of bf16 work left. Before the
engine turns it on: is cuDNN's fp8 attention faster on SDXL's shapes (head dimension 64, 4096 or 1024 tokens),
what do the casts around it cost, and how far is its output from bf16's?

Per shape, on the same Q, K, V (bf16, views of one fused-projection output, as the UNet has them):
- bf16: `F.scaled_dot_product_attention` on the strided views, with each backend torch offers here;
- fp8 kernel: the engine's op `imagesmith::fp8_sdpa` alone on e4m3 operands (its plan chosen on the first call);
- fp8 whole: the engine's `Fp8SelfAttention` compiled (the casts of Q, K, V to e4m3 fused into one kernel, the op,
  the output's cast back to bf16): what a UNet call pays, at most (compiled in a UNet the last cast fuses into
  the next layer's quantization);
- fidelity: relative L2 of each fp8 output (back in bf16) against bf16's, and of the kernel against the op's fp32
  reference arithmetic on the same e4m3 operands (engine/fp8_attention.py's `reference_fp8_sdpa`; batch 2 only:
  it holds the whole score matrix).

    PYTHONPATH=src python3 benchmarks/fp8_attention.py --batches 16,2 --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fp8_gemm import print_totals_table, time_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

# (tokens, heads, head dim, self-attentions per base UNet call) at 1024x1024: the 640-channel blocks have 2
# transformer layers in each of 2 down and 3 up attentions, the 1280-channel ones 10 in each of 2 down, 1 mid and
# 3 up (benchmarks/sdxl-architecture.json).
BASE_SHAPES: tuple[tuple[int, int, int, int], ...] = ((4096, 10, 64, 10), (1024, 20, 64, 60))
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def measure_shape(batch: int, tokens: int, heads: int, dim: int, repeats: int) -> dict[str, Any]:
    from imagesmith.engine.cudnn_graphs import plan_reports
    from imagesmith.engine.fp8 import calibrate_static_scales
    from imagesmith.engine.fp8_attention import Fp8SelfAttention, reference_fp8_sdpa

    torch.manual_seed(tokens + heads)
    inner = heads * dim
    # Peakier than N(0, 1) scores, as trained attention is: Q and K at twice unit scale.
    qkv = torch.randn(batch, tokens, 3 * inner, device="cuda", dtype=torch.bfloat16)
    qkv[..., : 2 * inner] *= 2
    q, k, v = qkv.chunk(3, dim=-1)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, tokens, heads, dim).transpose(1, 2)

    row: dict[str, Any] = {}
    expected = None
    for name, backend in BACKENDS.items():
        with sdpa_kernel([backend]):

            def bf16() -> torch.Tensor:
                return F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))

            row[f"bf16 {name}"] = time_ms(bf16, repeats)
            if expected is None and row[f"bf16 {name}"] == row[f"bf16 {name}"]:  # not NaN: it ran
                expected = bf16().transpose(1, 2).reshape(batch, tokens, inner)
    assert expected is not None, "no bf16 backend ran"

    attention = Fp8SelfAttention(heads).cuda()
    reports_before = len(plan_reports())
    with torch.no_grad():
        calibrate_static_scales(
            [attention.q_scale, attention.k_scale, attention.v_scale], lambda: attention(q, k, v)
        )
        eager = attention(q, k, v)  # the calibration's call chose the shape's plan
        row["plan"] = plan_reports()[reports_before:]
        compiled = torch.compile(attention, fullgraph=True)
        row["fp8 whole"] = time_ms(lambda: compiled(q, k, v), repeats)
        whole = compiled(q, k, v)
        scales: list[torch.Tensor] = []
        for layer in (attention.q_scale, attention.k_scale, attention.v_scale):
            assert layer.input_scale is not None, "calibration reached every scale"
            scales.append(layer.input_scale)
        q8, k8, v8 = (
            (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(batch, tokens, heads, dim)
            for x, s in zip((q, k, v), scales, strict=True)
        )
        v_scale = scales[2].reshape(1)
        factors = torch.cat(
            [s.reshape(1) for s in scales] + [v_scale.new_tensor([1 / 448, 448]), 1 / v_scale]
        )
        row["fp8 kernel"] = time_ms(lambda: torch.ops.imagesmith.fp8_sdpa(q8, k8, v8, factors), repeats)
        row["rel L2 vs bf16 (eager)"] = relative_l2(eager, expected)
        row["rel L2 vs bf16 (compiled)"] = relative_l2(whole, expected)
        if batch <= 2:
            kernel = torch.ops.imagesmith.fp8_sdpa(q8, k8, v8, factors)
            reference = reference_fp8_sdpa(q8, k8, v8, factors)
            row["rel L2 kernel vs its reference"] = relative_l2(kernel.float(), reference.float())
    row["tflop"] = 4 * batch * heads * tokens * tokens * dim / 1e12
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="16,2", help="the UNet's batch (images x 2 for guidance)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import cudnn  # nvidia-cudnn-frontend, after torch has loaded libcudnn

    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
        f"frontend {getattr(cudnn, '__version__', '?')}",
        flush=True,
    )
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batches": {},
    }
    methods = [f"bf16 {name}" for name in BACKENDS] + ["fp8 kernel", "fp8 whole"]
    for batch in (int(b) for b in args.batches.split(",")):
        rows = {}
        for tokens, heads, dim, count in BASE_SHAPES:
            label = f"{tokens} tokens x {heads} heads x {dim}"
            try:
                row = measure_shape(batch, tokens, heads, dim, args.repeats)
            except Exception as error:  # report and go on: the other shapes still say something
                print(f"batch {batch:2d} {label}: failed: {type(error).__name__}: {error}", flush=True)
                continue
            row["count"] = count
            rows[label] = row
            best_bf16 = min(row[f"bf16 {name}"] for name in BACKENDS)
            print(
                f"batch {batch:2d} {label:28s} x{count:2d} "
                + " | ".join(f"{m} {row[m]:.3f}" for m in methods)
                + f" | {row['tflop'] / best_bf16 * 1e3:.0f} -> {row['tflop'] / row['fp8 kernel'] * 1e3:.0f} TFLOP/s"
                + f" | rel L2 {row['rel L2 vs bf16 (compiled)']:.1e}"
                + f" (kernel vs reference {row.get('rel L2 kernel vs its reference', float('nan')):.1e})"
                + f" | plan {[(p['name'], p['seconds']) for p in row['plan']]}",
                flush=True,
            )
        if rows:
            totals = {m: sum(r[m] * r["count"] for r in rows.values()) for m in methods}
            report["batches"][batch] = {"shapes": rows, "per_base_unet_call_ms": totals}
        if args.out:
            args.out.write_text(json.dumps(report, indent=2, default=str))
    if report["batches"]:
        print_totals_table(
            "UNet batch",
            {batch: data["per_base_unet_call_ms"] for batch, data in report["batches"].items()},
            "ms per base UNet call, summed over its self-attentions",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
