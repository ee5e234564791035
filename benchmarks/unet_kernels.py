"""One UNet call of the 40-step ensemble (one image, two rows for guidance, 1024x1024), on a GPU: its GPU time
by kernel kind, and each kind's FLOPs and TFLOP/s.

Why: the fastest exact ensemble is UNet-bound (run 70: 1.330 s, of which 32 base calls of 31.2 ms and 8 refiner
calls of 33.2 ms on the GPU, the host hidden), and 1.2 s needs those calls ~10 % faster. Which kind of kernel
holds the time, and which runs furthest below the card (matmuls, convolutions, attention, the rest)? The
compiled call runs the same matmul (cuBLAS), convolution (cuDNN) and attention kernels as eager (inductor calls
them as extern kernels when max-autotune is off) and fuses the rest into Triton; so eager's matmul, convolution
and attention times are the compiled call's, and the compiled call less their sum is what its Triton kernels and
gaps take. Eager runs with the weights and inputs in NCHW and in channels-last (inductor lays a graph of many
convolutions out channels-last).

    python3 benchmarks/unet_kernels.py --out results.json [--unets base,refiner] [--variants eager,eager-cl]

Each row also says which operators launch the call's memsets (`memsets_by_op`): a compiled base call's CUDA graph
replays ~236 of them among its ~1,500 kernels (run 91), each a node the graph waits on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from attention_backends import unet_inputs
from fp8_gemm import event_times_ms
from kernel_kinds import memsets_by_operator
from sdxl_random import UNET_KEY, architecture
from vae_decode import profile_kinds

LATENT = 128  # 1024x1024 images
ROWS = 2  # one image with classifier-free guidance
DTYPE = torch.bfloat16
VARIANTS = ("eager", "eager-cl", "compiled-cl")  # compiled-cl: inductor, default mode (no CUDA graphs)


def build_unet(which: str, device: str) -> Any:
    """The full-size SDXL UNet (`base` or `refiner`) with random weights, bf16, QKV fused, as the engine holds
    it."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet: Any = UNet2DConditionModel(**architecture("full")[which][UNET_KEY])
    unet.eval().requires_grad_(False).to(DTYPE)
    unet.fuse_qkv_projections()
    return unet


@contextlib.contextmanager
def counting_flops() -> Iterator[dict[str, float]]:
    """FLOPs by kind (matmul, convolution, attention) of the module calls and attention calls made inside."""
    counts = {"matmul": 0.0, "convolution": 0.0, "attention": 0.0}

    def conv_hook(module: torch.nn.Conv2d, inputs: Any, output: torch.Tensor) -> None:
        k = module.kernel_size[0] * module.kernel_size[1]
        per_position = 2 * k * module.in_channels * module.out_channels // module.groups
        counts["convolution"] += per_position * output.shape[0] * output.shape[-2] * output.shape[-1]

    def linear_hook(module: torch.nn.Linear, inputs: Any, output: torch.Tensor) -> None:
        tokens = inputs[0].numel() // inputs[0].shape[-1]
        counts["matmul"] += 2 * tokens * module.in_features * module.out_features

    original = F.scaled_dot_product_attention

    def attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        # QK^T and PV: 2 x 2 x batch x heads x queries x keys x head dim.
        *lead, queries, head_dim = query.shape
        counts["attention"] += 4 * float(torch.Size(lead).numel()) * queries * key.shape[-2] * head_dim
        return original(query, key, value, *args, **kwargs)

    handles = [
        torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: (
                conv_hook(m, i, o)
                if isinstance(m, torch.nn.Conv2d)
                else linear_hook(m, i, o)
                if isinstance(m, torch.nn.Linear)
                else None
            )
        )
    ]
    F.scaled_dot_product_attention = attention  # diffusers' processors look it up on the module at each call
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()


def measure(unet: Any, which: str, variant: str, device: str, runs: int) -> dict[str, Any]:
    channels_last = variant.endswith("-cl")
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    inputs = unet_inputs(unet, ROWS, LATENT, device, DTYPE)
    if channels_last:
        inputs["sample"] = inputs["sample"].to(memory_format=torch.channels_last)

    compiled = torch.compile(unet, fullgraph=True) if variant.startswith("compiled") else unet

    def call() -> object:
        with torch.no_grad():
            return compiled(**inputs)

    flops: dict[str, float] = {}
    if compiled is unet:
        with counting_flops() as flops:
            call()
    # Compiled, the counting hooks would run while dynamo traces (not per call) and, removed, force a recompile:
    # its FLOPs are eager's (the same products), so none are counted.
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    call_ms = statistics.median(event_times_ms(call, runs))
    profile = profile_kinds(call, images=1)
    by_kind = profile["ms_by_kind"]
    row = {
        "unet": which,
        "variant": variant,
        "call_ms": round(call_ms, 3),
        "kernel_ms_total": profile["kernel_ms_total"],
        "ms_by_kind": by_kind,
        "tflop_by_kind": {k: round(v / 1e12, 3) for k, v in flops.items()},
        "tflop_s_by_kind": {
            k: round(v / 1e12 / (by_kind[k] / 1e3)) for k, v in flops.items() if by_kind.get(k, 0) > 0
        },
        "top_kernels": profile["top_kernels"],
        "memsets_by_op": memsets_by_op(call),
    }
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items())
    print(
        f"{which} {variant}: call {call_ms:.2f} ms, kernels {profile['kernel_ms_total']:.2f} ms: {kinds}; "
        f"memsets {sum(row['memsets_by_op'].values())}: {row['memsets_by_op']}",
        flush=True,
    )
    return row


def memsets_by_op(call: Any) -> dict[str, int]:
    """How many memsets one call launches, by the innermost operator (with its input shapes) that queued them."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            call()
            torch.cuda.synchronize()
    except RuntimeError as error:  # a profiler that cannot trace the host must not cost the row
        return {f"not traced: {error}"[:160]: 0}
    return memsets_by_operator(prof.events())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--unets", default="base,refiner")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = "cuda"
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "rows": [],
    }
    for which in args.unets.split(","):
        unet = build_unet(which, device)
        for variant in args.variants.split(","):
            results["rows"].append(measure(unet, which, variant, device, args.runs))
            Path(args.out).write_text(json.dumps(results, indent=1))
        del unet
        torch.cuda.empty_cache()
    print(
        f"\n{results['gpu']}, torch {results['torch']}, cuDNN {results['cudnn']}; ms (TFLOP/s) per guided call"
    )
    print("| unet | variant | call | kernels | matmul | convolution | attention | triton | other |")
    for row in results["rows"]:
        ms, rate = row["ms_by_kind"], row["tflop_s_by_kind"]
        cells = [
            f"{ms.get(k, 0):.2f}" + (f" ({rate[k]})" if k in rate else "")
            for k in ("matmul", "convolution", "attention", "triton (inductor)", "other")
        ]
        head = f"| {row['unet']} | {row['variant']} | {row['call_ms']:.2f} | {row['kernel_ms_total']:.2f} | "
        print(head + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
