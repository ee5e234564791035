"""The SDXL VAE's 1024x1024 decode alone, on a GPU: where its time goes, and what its convolutions could do.

Why: at the MLPerf setting a batch of 8 spends ~0.33 s of its ~4.1 s decoding (runs 49-60, one image at a time
through the compiled decoder, ~41-44 ms each), and 2.0 images/s needs ~0.1 s less per batch. One decode is
~10 TFLOP (counted below, 99 % of it 3x3 convolutions), so 44 ms is ~230 TFLOP/s, a quarter of the card's bf16
peak, while the UNets' compiled calls run at ~450. Before changing the engine: how fast is each of the decoder's
convolution shapes alone in cuDNN (the floor of any layout or mode), and where does the compiled decode lose the
rest (the profiler's kernels, by kind)?

Variants, each the engine's decode path (engine/decode.py's `_decode_once`: post-quant conv, then the decoder):
`eager` and `eager-cl` (weights and latents channels-last), `compiled` (what the engine runs:
`decoder.compile(fullgraph=True)`, torch.compile's default mode, NCHW weights; inductor picks the layout),
`compiled-cl` (the same with channels-last weights), `compiled-batch2` (two images in one call: whether a batched
decode would pay), `compiled-math` and `compiled-mathbf16` (the mid-block's attention, one head of 512 channels
over 16,384 positions, which no flash kernel takes, compiled as two matmuls and a softmax instead of the
memory-efficient kernel: torch's math path in fp32, or with `allow_fp16_bf16_reduction_math_sdp` in bf16 with fp32
accumulation), `compiled-routed` (the engine's form of the last: engine/decoder_attention.py's processor, matmuls
written in the traced code for bf16 decodes up to 128x128 latents), `compiled-dynamic` and
`compiled-routed-dynamic` (the same two after one decode of another size, so the timed 1024x1024 decode runs the
graph with symbolic height and width that a service ran once it had seen a second size), `compiled-routed-sized`
(the engine's decoder now: the last with engine/size_routing.py's routing, 1024x1024 warmed up, so after the other
size the timed decode runs its static graph), and `compiled-fp8conv`
(lossy: the decoder's eligible convolutions, all but its first and last, as the UNets' opt-in fp8 convolutions
(engine/fp8_conv.py: e4m3 filters and inputs, static input scales calibrated by one eager decode of other latents,
cuDNN's fastest fp8 plan), channels-last as the engine lays fp8 UNets out; it replaces the convolutions, so it runs
last). Each variant's image is compared with the first variant's (relative L2, and PSNR of the 8-bit pictures).
Figures: median ms per image over `--runs` CUDA-event-timed calls and TFLOP/s from the counted FLOPs; then, per
variant, one profiled decode's kernel time by kind (convolution, layout transpose, Triton (inductor's fused
pointwise and norms), attention, matmul, other).

    python3 benchmarks/vae_decode.py --out results.json [--variants compiled,compiled-cl]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fp8_conv import relative_l2
from fp8_gemm import event_times_ms, time_ms
from kernel_kinds import kind_of
from sdxl_random import VAE_KEY, architecture

from imagesmith.engine.decode import _decode_once, pixels_u8
from imagesmith.engine.decoder_attention import processors_kept, route_decoder_attention
from imagesmith.engine.size_routing import SizeRoutedCall

LATENT = 128  # 1024x1024 images
VARIANTS = (
    "eager",
    "eager-cl",
    "compiled",
    "compiled-cl",
    "compiled-batch2",
    "compiled-math",
    "compiled-mathbf16",
    "compiled-routed",
    "compiled-dynamic",
    "compiled-routed-dynamic",
    "compiled-routed-sized",
    "compiled-fp8conv",  # last: it swaps the decoder's convolutions for good
)
SECOND_SIZE = (96, 112)  # the -dynamic variants' first decode: 768x896
DTYPE = torch.bfloat16
DEVICE = "cuda"  # a module constant, so a CPU dry run of this script can change it


def build_vae(device: str) -> Any:
    """The full-size SDXL VAE with random weights, bf16, QKV fused, as the engine holds it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(device):
        vae: Any = AutoencoderKL(**architecture("full")["base"][VAE_KEY])
    vae.eval().requires_grad_(False).to(DTYPE)
    vae.fuse_qkv_projections()
    return vae


def count_flops(vae: Any, device: str) -> tuple[float, list[dict[str, Any]]]:
    """FLOPs of one image's decode (convolutions, linears, the mid-block's attention) and each distinct
    convolution shape with its count, from hooks on one eager decode."""
    shapes: dict[tuple[int, int, int, int], int] = {}
    flops = [0.0]

    def conv_hook(module: torch.nn.Conv2d, inputs: Any, output: torch.Tensor) -> None:
        k = module.kernel_size[0] * module.kernel_size[1]
        flops[0] += 2 * k * module.in_channels * module.out_channels * output.shape[-2] * output.shape[-1]
        key = (module.in_channels, module.out_channels, module.kernel_size[0], inputs[0].shape[-1])
        shapes[key] = shapes.get(key, 0) + 1

    def linear_hook(module: torch.nn.Linear, inputs: Any, output: torch.Tensor) -> None:
        tokens = inputs[0].numel() // inputs[0].shape[-1]
        flops[0] += 2 * tokens * module.in_features * module.out_features

    handles = [
        m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else linear_hook)
        for m in [vae.post_quant_conv, *vae.decoder.modules()]
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    with torch.no_grad():
        _decode_once(vae, torch.randn(1, 4, LATENT, LATENT, device=device), DTYPE, torch.device(device))
    for handle in handles:
        handle.remove()
    # The mid-block's one attention: a single head over every latent position, QK^T and PV.
    tokens, width = LATENT * LATENT, vae.decoder.mid_block.attentions[0].inner_dim
    flops[0] += 4 * tokens * tokens * width
    rows = [
        {"in": ci, "out": co, "kernel": k, "size": size, "count": n}
        for (ci, co, k, size), n in shapes.items()
    ]
    return flops[0], rows


def conv_floor(rows: list[dict[str, Any]], runs: int) -> list[dict[str, Any]]:
    """Each convolution shape alone in bf16 (cuDNN picking its fastest algorithm), NCHW and channels-last:
    what the decode's convolutions could take at best in either layout."""
    torch.backends.cudnn.benchmark = True
    for row in rows:
        x = torch.randn(1, row["in"], row["size"], row["size"], device=DEVICE, dtype=DTYPE)
        w = torch.randn(row["out"], row["in"], row["kernel"], row["kernel"], device=DEVICE, dtype=DTYPE)
        b = torch.randn(row["out"], device=DEVICE, dtype=DTYPE)
        pad = row["kernel"] // 2
        flops = 2 * row["kernel"] ** 2 * row["in"] * row["out"] * row["size"] ** 2
        for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            xl, wl = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)

            def conv(xl: torch.Tensor = xl, wl: torch.Tensor = wl) -> torch.Tensor:
                return F.conv2d(xl, wl, b, padding=pad)  # noqa: B023 (called only in this iteration)

            ms = time_ms(conv, runs)  # its warm-up calls let cuDNN's benchmark choose first
            row[f"{layout}_ms"] = ms
            row[f"{layout}_tflop_s"] = flops / ms / 1e9
        print(
            f"conv {row['in']}->{row['out']} k{row['kernel']} @{row['size']} x{row['count']}: "
            f"NCHW {row['nchw_ms']:.3f} ms ({row['nchw_tflop_s']:.0f} TFLOP/s), "
            f"NHWC {row['nhwc_ms']:.3f} ms ({row['nhwc_tflop_s']:.0f} TFLOP/s)",
            flush=True,
        )
    torch.backends.cudnn.benchmark = False
    return rows


def profile_kinds(fn: Callable[[], object], images: int, top: int = 10) -> dict[str, Any]:
    """One call's GPU kernel time per image, by kind, and its `top` longest kernels (grouped by name)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            kernels.setdefault(event.name, []).append(event.device_time_total / 1e3)
    kinds: dict[str, float] = {}
    for name, times in kernels.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + sum(times) / images
    longest = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "ms_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "kernel_ms_total": round(sum(kinds.values()), 3),
        "top_kernels": [
            {"name": name[:120], "calls": len(t), "ms": round(sum(t) / images, 3), "kind": kind_of(name)}
            for name, t in longest
        ],
    }


@contextlib.contextmanager
def variant_state(vae: Any, variant: str) -> Iterator[int]:
    """The VAE set up as `variant` asks; yields the images per call. Undone after, for the next variant."""
    channels_last = variant.endswith("-cl")
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    if variant.endswith("-fp8conv"):
        layers = fp8_convolutions(vae)
        print(f"{variant}: {len(layers)} convolutions in fp8", flush=True)
    with processors_kept(vae.decoder):
        if "-routed" in variant:
            print(f"{variant}: {route_decoder_attention(vae.decoder)} attention blocks routed", flush=True)
        if variant.startswith("compiled"):
            torch._dynamo.reset()
            if "-sized" in variant:  # as engine/fast.py compiles it, after a warm-up at 1024x1024
                routed = SizeRoutedCall(vae.decoder._call_impl, {"fullgraph": True})
                routed.keep_static((LATENT, LATENT))
                vae.decoder._compiled_call_impl = routed
            else:
                vae.decoder.compile(fullgraph=True)
        reduced = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(variant.endswith("-mathbf16"))
        try:
            yield 2 if variant.endswith("batch2") else 1
        finally:
            vae.decoder._compiled_call_impl = None
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(reduced)
            if channels_last:
                vae.to(memory_format=torch.contiguous_format)


def fp8_convolutions(vae: Any) -> list[Any]:
    """The decoder's eligible convolutions swapped for the engine's Float8Conv2d, channels-last, their input
    scales calibrated by one eager decode of latents no timed call uses (the engine calibrates on a real
    generation at start-up)."""
    from imagesmith.engine.fp8 import Fp8Layer, calibrate_static_scales
    from imagesmith.engine.fp8_conv import Float8Conv2d, quantize_convolutions

    quantize_convolutions(vae.decoder)
    vae.to(memory_format=torch.channels_last)
    layers: list[Fp8Layer] = [module for module in vae.decoder.modules() if isinstance(module, Float8Conv2d)]
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    sample = torch.randn(1, 4, LATENT, LATENT, device=DEVICE, generator=generator)
    with torch.no_grad():
        calibrate_static_scales(layers, lambda: _decode_once(vae, sample, DTYPE, torch.device(DEVICE)))
    return layers


def attention_for(variant: str) -> contextlib.AbstractContextManager[object]:
    """The math path for the -math variants (chosen when the graph is traced, so around every call, the first
    one included); torch's own choice otherwise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH]) if "-math" in variant else contextlib.nullcontext()


_FIRST_IMAGE: list[torch.Tensor] = []  # the first variant's image, which the others are compared with


def measure_variant(vae: Any, variant: str, flops: float, runs: int) -> dict[str, Any]:
    device = torch.device(DEVICE)
    with variant_state(vae, variant) as images:
        torch.manual_seed(1)  # every variant decodes the same latents: their images are compared
        latents = torch.randn(images, 4, LATENT, LATENT, device=DEVICE)
        if variant.endswith("-cl"):
            latents = latents.contiguous(memory_format=torch.channels_last)

        def decode() -> torch.Tensor:
            with torch.no_grad(), attention_for(variant):
                return _decode_once(vae, latents, DTYPE, device)

        if variant.endswith(("-dynamic", "-sized")):
            # Another size first (both sides differ): dynamo then traces the 1024x1024 decode with its height and
            # width symbolic, as a service's decoder ran after its second image size; routed by size, the
            # 1024x1024 decode keeps its static graph.
            other = torch.randn(images, 4, SECOND_SIZE[0], SECOND_SIZE[1], device=DEVICE)
            with torch.no_grad(), attention_for(variant):
                _decode_once(vae, other, DTYPE, device)
        t0 = time.perf_counter()
        decode()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        for _ in range(2):
            decode()
        torch.cuda.reset_peak_memory_stats()
        times = event_times_ms(decode, runs)
        ms = statistics.median(times)
        per_image = ms / images
        row: dict[str, Any] = {
            "images_per_call": images,
            "ms_per_image": round(per_image, 3),
            "ms_range": [round(min(times) / images, 3), round(max(times) / images, 3)],
            "tflop_s": round(flops / per_image / 1e9, 1),
            "first_call_s": round(first_s, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "profile": profile_kinds(decode, images),
        }
        image = decode()[:1].float().cpu()
        if not _FIRST_IMAGE:
            _FIRST_IMAGE.append(image)
        first = _FIRST_IMAGE[0]
        row["rel_l2_vs_first_variant"] = relative_l2(image, first)
        row["psnr_vs_first_variant_db"] = round(psnr_8bit(image, first), 2)
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in row["profile"]["ms_by_kind"].items())
    print(
        f"{variant}: {per_image:.2f} ms/image ({row['tflop_s']:.0f} TFLOP/s), first call {first_s:.1f} s, "
        f"peak {row['peak_gib']} GiB; kernels ms/image: {kinds}",
        flush=True,
    )
    return row


def psnr_8bit(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of the two decodes as the 8-bit pictures the engine writes (engine/decode.py's pixels_u8)."""
    mse = float(((pixels_u8(image).float() - pixels_u8(reference).float()) ** 2).mean())
    return 10 * math.log10(255**2 / mse) if mse else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-conv-floor", dest="conv_floor", action="store_false")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "compiled-fp8conv" in variants[:-1]:
        parser.error("--variants: compiled-fp8conv replaces the decoder's convolutions, so it must come last")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("vae_decode.py measures a GPU; none here", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    # Each variant compiles from scratch: inductor's caches key on the traced graph, which holds one attention call
    # whatever path runs it, so with them the -math variants got the first variant's kernels (run 80's first try).
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "variants": {},
    }
    print(f"# {report['device']}, torch {report['torch']}, cuDNN {report['cudnn']}", flush=True)

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))

    vae = build_vae(DEVICE)
    flops, shapes = count_flops(vae, DEVICE)
    report["tflop_per_image"] = round(flops / 1e12, 3)
    print(f"one 1024x1024 decode: {flops / 1e12:.2f} TFLOP, {len(shapes)} convolution shapes", flush=True)
    if args.conv_floor:
        report["conv_shapes"] = conv_floor(shapes, args.runs)
        for layout in ("nchw", "nhwc"):
            report[f"conv_floor_{layout}_ms"] = round(sum(r[f"{layout}_ms"] * r["count"] for r in shapes), 2)
        save()
    for variant in variants:
        report["variants"][variant] = measure_variant(vae, variant, flops, args.runs)
        save()

    print(
        "\n| variant | ms/image | TFLOP/s | convolution | transpose | triton | attention | other | first call s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, row in report["variants"].items():
        kinds = row["profile"]["ms_by_kind"]
        other = sum(
            v
            for k, v in kinds.items()
            if k not in ("convolution", "layout transpose", "triton (inductor)", "attention")
        )
        print(
            f"| {variant} | {row['ms_per_image']:.2f} | {row['tflop_s']:.0f} | {kinds.get('convolution', 0):.1f} | "
            f"{kinds.get('layout transpose', 0):.1f} | {kinds.get('triton (inductor)', 0):.1f} | "
            f"{kinds.get('attention', 0):.1f} | {other:.1f} | {row['first_call_s']} |"
        )
    if args.conv_floor:
        print(
            f"(the decode's convolutions alone, each shape's fastest cuDNN algorithm: NCHW "
            f"{report['conv_floor_nchw_ms']} ms, channels-last {report['conv_floor_nhwc_ms']} ms an image)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
