"""Which scaled-dot-product-attention backend runs SDXL's attention fastest, and how much of a UNet call it is.

1. Records every `F.scaled_dot_product_attention` call of one base and one refiner UNet call at 1024x1024
   (shapes and counts; batch 2 is the ensemble with guidance, batch 16 the MLPerf setting at 8 images).
2. Times each distinct shape with each fused backend (flash, efficient, cudnn) and sums them per UNet call:
   the attention milliseconds each backend would spend, with its largest difference from flash's output.
3. Profiles one eager UNet call per backend and splits the GPU kernel time into attention, GEMM, convolution
   and the rest, so the attention share is measured rather than guessed.

With --flex, step 2 also times torch's FlexAttention (flex_attention compiled by inductor into a Triton kernel,
no score modification: plain attention), with its default kernel options and with each of --flex-options: the one
attention kernel torch 2.11 ships besides cuDNN's, flash's and the memory-efficient one (FlashAttention-3 is a
separate build no package index here has).

Usage:  PYTHONPATH=src python benchmarks/attention_backends.py --out DIR [--batches 2,16] [--smoke] [--flex]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_kinds import kind_of
from sdxl_random import UNET_KEY, architecture

from imagesmith.engine.attention import attention_priority

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
Shape = tuple[tuple[int, ...], tuple[int, ...]]  # (query shape, key shape)


def record_attention_shapes(unet: Any, inputs: dict[str, Any]) -> Counter[Shape]:
    """Run the UNet once with scaled_dot_product_attention wrapped, counting (q, k) shapes."""
    seen: Counter[Shape] = Counter()
    original = F.scaled_dot_product_attention

    def recording(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen[(tuple(query.shape), tuple(key.shape))] += 1
        return original(query, key, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            unet(**inputs)
    finally:
        F.scaled_dot_product_attention = original
    return seen


def time_ms(fn: Any, runs: int, cuda: bool) -> float:
    """Median milliseconds of `fn`, timed with CUDA events on a GPU (kernel time, no launch gaps)."""
    fn()
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1000)
    return sorted(times)[len(times) // 2]


def attention_flop(shape: Shape) -> float:
    (batch, heads, queries, dim), (_, _, keys, _) = shape
    return 4.0 * batch * heads * queries * keys * dim  # QK^T and PV, 2 flop per multiply-add


def flex_backends(options: list[str]) -> dict[str, Any]:
    """FlexAttention as named callables: "flex" with inductor's default kernel options, then one per entry of
    `options` ("KEY=VALUE;KEY=VALUE", e.g. "BLOCK_M=128;BLOCK_N=64;num_warps=8"), each compiled once."""
    from torch.nn.attention.flex_attention import flex_attention

    def parsed(text: str) -> dict[str, Any]:
        pairs = (item.split("=", 1) for item in text.split(";") if item)
        return {key: (value == "True") if value in ("True", "False") else int(value) for key, value in pairs}

    # One graph per shape and kernel option (dynamic=False keeps each kernel specialised, as in a UNet's graph):
    # more than dynamo's default of 8, after which it would fall back to eager flex and time that instead.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    compiled = torch.compile(flex_attention, dynamic=False)
    backends: dict[str, Any] = {"flex": compiled}
    for text in options:
        kernel_options = parsed(text)
        backends[f"flex[{text}]"] = lambda q, k, v, o=kernel_options: compiled(q, k, v, kernel_options=o)
    return backends


def timed_attention(
    attend: Any,
    context: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    reference: torch.Tensor,
    flop: float,
    runs: int,
    cuda: bool,
) -> dict[str, Any]:
    """`attend(query, key, value)` under `context()`: its median ms, TFLOP/s and largest difference from
    `reference` (torch's default choice)."""
    with context():
        out = attend(query, key, value)
        ms = time_ms(lambda: attend(query, key, value), runs, cuda)
    return {
        "ms": ms,
        "tflops": flop / ms / 1e9,
        "max_abs_diff_vs_default": float((out.float() - reference.float()).abs().max()),
    }


def time_backends(
    shapes: Counter[Shape], dtype: torch.dtype, device: str, runs: int, flex: dict[str, Any] | None = None
) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    rows: list[dict[str, Any]] = []
    totals: dict[str, float] = {}
    for shape, count in sorted(shapes.items(), key=lambda item: -attention_flop(item[0]) * item[1]):
        q_shape, k_shape = shape
        query = torch.randn(q_shape, device=device, dtype=dtype)
        key = torch.randn(k_shape, device=device, dtype=dtype)
        value = torch.randn(k_shape, device=device, dtype=dtype)
        reference = F.scaled_dot_product_attention(query, key, value)
        # The reference is torch's default choice: a backend with difference 0.0 on every shape is the one
        # torch picks by itself.
        row: dict[str, Any] = {"q": q_shape, "k": k_shape, "calls_per_unet": count}
        timing = (query, key, value, reference, attention_flop(shape), runs, cuda)
        for name, backend in BACKENDS.items():
            context = (lambda backend=backend: sdpa_kernel(backend)) if cuda else nullcontext
            try:
                row[name] = timed_attention(F.scaled_dot_product_attention, context, *timing)
            except RuntimeError as error:  # the backend does not support this shape or device
                row[name] = {"unsupported": str(error).splitlines()[0][:200]}
        for name, attend in (flex or {}).items():
            try:
                row[name] = timed_attention(attend, nullcontext, *timing)
            except Exception as error:  # a kernel option the card cannot run (shared memory): said, not fatal
                row[name] = {"unsupported": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        for name in [*BACKENDS, *(flex or {})]:
            # An unsupported shape makes the backend's sum NaN, for good.
            totals[name] = totals.get(name, 0.0) + row[name].get("ms", float("nan")) * count
        rows.append(row)
    return {"shapes": rows, "attention_ms_per_unet_call": totals}


def longest_first(times: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(times.items(), key=lambda item: -item[1])


def kernel_time_by_kind(prof: Any, name_chars: int) -> tuple[dict[str, float], dict[str, float]]:
    """Microseconds of GPU kernel time in a torch.profiler run, by kind (kind_of) and by kernel name (cut to
    `name_chars`). Kernels inside CUDA graphs are recorded one by one too."""
    from torch.autograd import DeviceType

    by_kind: defaultdict[str, float] = defaultdict(float)
    kernels: defaultdict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA:
            continue
        us = float(event.self_device_time_total)
        by_kind[kind_of(event.key)] += us
        kernels[event.key[:name_chars]] += us
    return by_kind, kernels


def profile_unet(unet: Any, inputs: dict[str, Any], backend: str) -> dict[str, Any]:
    """GPU kernel time of one eager UNet call with `backend` first, by kind, and the ten longest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), attention_priority(backend):
        unet(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            unet(**inputs)
            torch.cuda.synchronize()
    by_kind, kernels = kernel_time_by_kind(prof, name_chars=110)
    total = sum(by_kind.values())
    return {
        "kernel_ms": total / 1000,
        "by_kind_ms": {kind: us / 1000 for kind, us in longest_first(by_kind)},
        "by_kind_share": {kind: us / total for kind, us in longest_first(by_kind)} if total else {},
        "top_kernels_ms": [(name, us / 1000) for name, us in longest_first(kernels)[:10]],
    }


def profile_compiled(
    unet: Any, inputs: dict[str, Any], backend: str, cache: Path, mode: str
) -> dict[str, Any]:
    """As profile_unet, for the UNet compiled while `backend` is first. Each backend gets its own inductor
    cache: the AOTAutograd cache keys on the traced graph, where attention is still one SDPA call, so a
    shared cache would hand the second backend the first one's kernels."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, mode=None if mode == "default" else mode)
    began = time.perf_counter()
    with torch.no_grad(), attention_priority(backend):
        for _ in range(3):  # compile; with CUDA graphs also their warm-up and recording
            compiled(**inputs)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - began
        gpu_ms = time_ms(lambda: compiled(**inputs), 10, True)
    row = profile_unet(compiled, inputs, backend)
    return {**row, "compile_s": compile_s, "event_timed_ms": gpu_ms}


def unet_inputs(unet: Any, batch: int, latent: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """What the SDXL pipelines pass: text embeddings of 77 tokens and the added time/text conditioning."""
    config = unet.config
    time_ids = (
        6 if config.addition_time_embed_dim * 6 + 1280 == config.projection_class_embeddings_input_dim else 5
    )
    pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": torch.randn(
            batch, 77, config.cross_attention_dim, device=device, dtype=dtype
        ),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.randn(batch, time_ids, device=device, dtype=dtype),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "attention-out"))
    parser.add_argument("--batches", default="2,16")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, to prove the code path")
    parser.add_argument("--roles", default="base,refiner")
    parser.add_argument(
        "--fused-qkv", action="store_true", help="fuse Q, K, V as the engine does with compile"
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also profile the UNet compiled (mode default, fullgraph), one fresh inductor cache per backend",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode for --compiled")
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention in step 2")
    parser.add_argument(
        "--flex-options",
        default="",
        help="comma-separated FlexAttention kernel options to time as well, each KEY=VALUE;KEY=VALUE",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip step 3 (the eager UNet profiles)")
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    arch = architecture("smoke" if args.smoke else "full")
    latent = 8 if args.smoke else 128
    results: dict[str, Any] = {
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "gpu": torch.cuda.get_device_name() if cuda else "cpu",
            "diffusers": __import__("diffusers").__version__,
        },
        "unets": {},
    }
    # torch settles its default order at the first attention call (cuDNN first on Hopper with cuDNN 9.15+),
    # so it is read after one; before, it reports the static order with flash first.
    probe = torch.randn(1, 1, 64, 64, device=device, dtype=dtype)
    F.scaled_dot_product_attention(probe, probe, probe)
    results["default_priority"] = [SDPBackend(int(b)).name for b in torch._C._get_sdp_priority_order()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["fused_qkv"], results["compile_mode"] = args.fused_qkv, args.compile_mode
    try:  # compiled once; each shape then compiles its own kernel on first use
        flex = flex_backends([o for o in args.flex_options.split(",") if o]) if args.flex else None
    except ValueError as error:  # a value neither an integer nor True/False
        parser.error(f"--flex-options: {error}")
    for role in args.roles.split(","):
        torch.manual_seed(0)
        with torch.device(device):
            built: Any = UNet2DConditionModel(**arch[role][UNET_KEY])  # diffusers' decorators hide nn.Module
            unet = built.eval().requires_grad_(False).to(dtype)
        if args.fused_qkv:
            unet.fuse_qkv_projections()
        for batch in (int(b) for b in args.batches.split(",")):
            inputs = unet_inputs(unet, batch, latent, device, dtype)
            shapes = record_attention_shapes(unet, inputs)
            row: dict[str, Any] = time_backends(shapes, dtype, device, args.runs, flex)
            if cuda and not args.no_profile:
                row["profile"] = {}
                for name in BACKENDS:
                    try:
                        row["profile"][name] = profile_unet(unet, inputs, name)
                    except RuntimeError as error:
                        row["profile"][name] = {"error": str(error)[:300]}
                if args.compiled:
                    row["compiled_profile"] = {
                        name: profile_compiled(
                            unet, inputs, name, out / f"inductor-{role}-{batch}-{name}", args.compile_mode
                        )
                        for name in BACKENDS
                        if name != "efficient"
                    }
            results["unets"][f"{role} batch {batch}"] = row
            print(
                f"{role} batch {batch}: attention ms per UNet call {row['attention_ms_per_unet_call']}",
                flush=True,
            )
            (out / "attention_backends.json").write_text(json.dumps(results, indent=1, default=str))
        del unet
        if cuda:
            torch.cuda.empty_cache()
    print(f"default priority: {results['default_priority']}")
    for label, row in results["unets"].items():
        same = [
            name
            for name in BACKENDS
            if all(shape.get(name, {}).get("max_abs_diff_vs_default") == 0.0 for shape in row["shapes"])
        ]
        print(f"{label}: bit-identical to torch's default on every shape: {same or 'none'}")
    for label, row in results["unets"].items():
        for name, prof in row.get("compiled_profile", {}).items():
            kinds = prof.get("by_kind_ms", {})
            print(
                f"compiled {label} {name}: {prof.get('event_timed_ms', float('nan')):.2f} ms per call "
                f"(compile {prof.get('compile_s', 0):.0f}s); kernels "
                + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items())
            )
    print(
        "| UNet call | backend | attention ms (micro) | profiled kernel ms | attention | matmul | conv | other |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, row in results["unets"].items():
        for name in BACKENDS:
            prof = row.get("profile", {}).get(name, {})
            kinds = prof.get("by_kind_ms", {})
            print(
                f"| {label} | {name} | {row['attention_ms_per_unet_call'].get(name, float('nan')):.2f} | "
                f"{prof.get('kernel_ms', float('nan')):.2f} | "
                + " | ".join(
                    f"{kinds.get(k, 0.0):.2f}" for k in ("attention", "matmul", "convolution", "other")
                )
                + " |"
            )


if __name__ == "__main__":
    main()
