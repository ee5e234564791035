"""FlashAttention-4's Hopper forward kernel (the `flash-attn-4` package, written in CuTe DSL) against cuDNN's
attention, torch's default, on every attention shape of SDXL's two UNets at 1024x1024 with guidance (batch 2).

Why: a compiled base UNet call spends 4.5 ms of ~30 in cuDNN's attention (run 91), about 330 TFLOP/s on its
self-attention, and each cuDNN call also queues a memset (140 a base call). FlexAttention, flash (FA2) and the
memory-efficient kernel were all slower (runs 19-23, 80). FA4 is the one attention kernel for Hopper left
unmeasured: it is not part of torch 2.11 and installs from PyPI as Python plus NVIDIA's CuTe DSL compiler,
compiling its kernels on first use. This decides whether it is worth routing the UNets' attention through it.

Each shape runs as the compiled UNet runs it: queries, keys and values laid out as the fused projections leave
them (one (batch, tokens, 3 x channels) tensor for self-attention), many calls back to back inside one CUDA graph,
so launch costs do not count. Each kernel's output is compared with fp64 attention (relative L2).

    python3 benchmarks/attention_fa4.py --out results.json [--reps 50] [--replays 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_attention import add_graph_timing_arguments, graph_timing, graphed_ms, relative_l2

HEAD_DIM = 64
PROMPT_KEYS = 77
# (UNet, heads, queries, keys, calls per UNet call) at 1024x1024, batch 2 (run 91's profile): self-attention
# (keys = queries) and cross-attention (77 prompt keys) at each level.
SHAPES = (
    ("base", 10, 4096, 4096, 10),
    ("base", 20, 1024, 1024, 60),
    ("base", 10, 4096, PROMPT_KEYS, 10),
    ("base", 20, 1024, PROMPT_KEYS, 60),
    ("refiner", 12, 4096, 4096, 20),
    ("refiner", 24, 1024, 1024, 20),
    ("refiner", 24, 256, 256, 4),
    ("refiner", 12, 4096, PROMPT_KEYS, 20),
    ("refiner", 24, 1024, PROMPT_KEYS, 20),
    ("refiner", 24, 256, PROMPT_KEYS, 4),
)
BATCH = 2


def projected(heads: int, queries: int, keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K and V as (batch, tokens, heads, 64) views of what diffusers' fused projections return."""
    width = heads * HEAD_DIM
    if keys == queries:  # self-attention: one to_qkv output, split three ways
        qkv = torch.randn(BATCH, queries, 3 * width, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.split(width, dim=-1)
    else:  # cross-attention: to_q, and one to_kv output over the prompt's tokens
        q = torch.randn(BATCH, queries, width, device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn(BATCH, keys, 2 * width, device="cuda", dtype=torch.bfloat16).split(width, dim=-1)
    return (
        q.unflatten(-1, (heads, HEAD_DIM)),
        k.unflatten(-1, (heads, HEAD_DIM)),
        v.unflatten(-1, (heads, HEAD_DIM)),
    )


def variants() -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Each kernel as a function of (batch, tokens, heads, 64) views; its output in the same layout."""
    from flash_attn.cute.interface import _flash_attn_fwd

    def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # diffusers hands SDPA (batch, heads, tokens, 64) views of the same memory.
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _flash_attn_fwd(q, k, v, softmax_scale=HEAD_DIM**-0.5)[0]

    return {"cudnn": cudnn, "fa4": fa4}


def fp64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * HEAD_DIM**-0.5
    return (scores.softmax(-1) @ v).transpose(1, 2)


def measure(shape: tuple[str, int, int, int, int], reps: int, replays: int) -> dict[str, Any]:
    unet, heads, queries, keys, calls = shape
    torch.manual_seed(0)
    q, k, v = projected(heads, queries, keys)
    reference = fp64_attention(q, k, v)
    flop = 4 * BATCH * heads * queries * keys * HEAD_DIM
    row: dict[str, Any] = {
        "unet": unet,
        "shape": f"{BATCH} x {heads} x {queries} x {keys}",
        "calls_per_unet_call": calls,
    }
    for name, attend in variants().items():
        began = time.perf_counter()
        try:
            out = attend(q, k, v)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - began  # FA4 compiles its kernel on first use
            times = graphed_ms(lambda: attend(q, k, v), reps, replays)  # noqa: B023  (used before the next)
        except Exception as error:  # a kernel that cannot run this shape: said, and the sum becomes NaN
            row[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            continue
        row[name] = {
            **graph_timing(times, flop / 1e12, calls),
            "rel_l2_vs_fp64": relative_l2(out, reference),
            "first_call_s": round(first_s, 2),
        }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_graph_timing_arguments(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from importlib.metadata import version

    result: dict[str, Any] = {
        "versions": {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(),
            "flash_attn_4": version("flash-attn-4"),
            "cutlass_dsl": version("nvidia-cutlass-dsl-libs-base"),
        },
        "shapes": [measure(shape, args.reps, args.replays) for shape in SHAPES],
    }
    totals: dict[str, dict[str, float]] = {}
    for row in result["shapes"]:
        for name in ("cudnn", "fa4"):
            per_unet = totals.setdefault(row["unet"], {})
            per_unet[name] = per_unet.get(name, 0.0) + row[name].get("ms_per_unet_call", float("nan"))
    result["ms_per_unet_call"] = totals
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        "| UNet | shape (batch x heads x queries x keys) | calls | cuDNN us (TFLOP/s) | FA4 us (TFLOP/s) | rel. L2 cuDNN / FA4 |"
    )
    print("|---|---|---|---|---|---|")
    for row in result["shapes"]:
        cells = []
        for name in ("cudnn", "fa4"):
            entry = row[name]
            cells.append(
                f"{entry['us_per_call']} ({entry['tflop_s']})"
                if "us_per_call" in entry
                else entry["error"][:60]
            )
        errors = " / ".join(str(row[name].get("rel_l2_vs_fp64", "-")) for name in ("cudnn", "fa4"))
        print(
            f"| {row['unet']} | {row['shape']} | {row['calls_per_unet_call']} | {cells[0]} | {cells[1]} | {errors} |"
        )
    for unet, per in totals.items():
        print(f"{unet}: attention ms per UNet call: cuDNN {per['cudnn']:.3f}, FA4 {per['fa4']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
