"""One compiled UNet call of the 40-step ensemble (one image, two rows for guidance, 1024x1024) under inductor's
tuning options, all in one process: does any compile-side lever give the exact 1.2 s?

Why: the fastest exact ensemble is 1.330 s, the UNets' 1.265 s of GPU time plus the decode (run 70), and 1.2 s
needs each UNet call ~3.25 ms (~10 %) faster. In the base call the matmuls and convolutions already run at ~650
TFLOP/s and attention at 347; ~8 ms goes to inductor's Triton kernels and the gaps between kernels (run 72). Two
levers act on exactly that and were never measured, because each needs a compile of its own and the engine's
whole compile (both UNets, the decoder, every batch graph) left no room in a device call:
- `coordinate_descent_tuning`: inductor times block sizes for each of its pointwise and reduction kernels (the
  norms, GEGLU, the residual adds) instead of taking its heuristics';
- `max_autotune`: Triton matmul templates timed against cuBLAS for every matmul shape, with the pointwise work
  around a matmul fused into the template (epilogue, prologue), which an extern cuBLAS call cannot take. The
  convolutions stay with cuDNN (`max_autotune_conv_backends=ATEN`): Triton's convolution templates took most of
  run 17's unfinished 420 s of autotuning, and cuDNN's convolutions are not where the time is.

`ro+anysize` is the graph a service's UNet ran after its second image size, until engine/size_routing.py: the
same options, the latents' height and width symbolic. Its cost per call says what the routing saves.

`ro+anysize+cl` is that graph with the UNet's weights channels-last (IMAGESMITH_CHANNELS_LAST): the layout inductor
does not choose for a graph with symbolic sides.

`ro+cl` is the static graph with the weights channels-last: inductor's static graphs copy every NCHW 3x3
convolution weight into channels-last on each call, which such weights skip (run 89: -0.45 ms a base call).
`default+anysize+cl` is the any-size graph with channels-last weights and no CUDA graphs (run 89: host-bound).

`ro+regions` is the engine's IMAGESMITH_COMPILE_REGIONS (engine/compile_regions.py): the same options, each kind
of transformer block compiled once. It is here for its price per call (fusion lost at block boundaries) and, with
`--first ro+regions --fresh-cache`, its cold compile against the peer's cold compile in another run.

Here only one UNet compiles, once per variant, at the one shape the ensemble needs, so every variant fits one
call. Each variant compiles its own copy of the UNet (the same random weights), so all stay callable and the
timing can alternate between them: right after its compile a variant is timed against `ro` (the engine's
`reduce-overhead`, the peer), and at the end all are timed round-robin. Rows are written after each step, so a
call that runs out of time keeps what finished.

Reported per variant: compile seconds (its first call), the call's median GPU time (CUDA events around a graph
replay) and its difference from the peer's in the same rounds, the output's relative L2 against the peer's on the
same inputs (both bf16; a Triton matmul accumulates in fp32 like cuBLAS, so this should stay at bf16's ~1e-3
to 1e-2), and with --profile the GPU time by kernel kind.

    python3 benchmarks/unet_compiled.py --out results.json [--unet base] [--variants ro,ro+cdt,mat,mat+cdt]
    python3 benchmarks/unet_compiled.py --out r.json --variants ro+regions --first ro+regions --fresh-cache
    python3 benchmarks/unet_compiled.py --out /tmp/x.json --smoke     # CPU, toy UNet, proves the code path
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from attention_backends import unet_inputs
from fp8_conv import relative_l2
from fp8_gemm import event_times_ms
from sdxl_random import UNET_KEY, architecture
from vae_decode import profile_kinds

from imagesmith.engine.compile_regions import compile_transformer_blocks_once

LATENT = 128  # 1024x1024 images
ROWS = 2  # one image with classifier-free guidance
CUDA_GRAPHS = {"triton.cudagraphs": True}  # what mode="reduce-overhead" sets
# Convolutions stay with cuDNN under max_autotune (the module docstring says why).
MAX_AUTOTUNE = {"max_autotune": True, "max_autotune_conv_backends": "ATEN"}
COORDINATE_DESCENT = {"coordinate_descent_tuning": True}
# torch.compile's `options` for each variant; `ro` is the engine's IMAGESMITH_COMPILE=reduce-overhead.
VARIANTS: dict[str, dict[str, Any]] = {
    "ro": CUDA_GRAPHS,
    "ro+cdt": {**CUDA_GRAPHS, **COORDINATE_DESCENT},
    "mat": {**CUDA_GRAPHS, **MAX_AUTOTUNE},
    "mat+cdt": {**CUDA_GRAPHS, **MAX_AUTOTUNE, **COORDINATE_DESCENT},  # mode="max-autotune", cuDNN's convs
}
PEER = "ro"
# Variants whose UNet has its transformer blocks marked as nested compile regions (IMAGESMITH_COMPILE_REGIONS,
# engine/compile_regions.py): the same options, a different graph to compile.
VARIANTS["ro+regions"] = CUDA_GRAPHS
# Variants whose graph has the latents' height and width symbolic: the graph dynamo makes at a second image size,
# which served every size, the warmed-up one included, before engine/size_routing.py kept those static.
VARIANTS["ro+anysize"] = CUDA_GRAPHS
# The same graph without CUDA graphs (inductor's default mode). Under reduce-overhead the any-size graph records a
# CUDA graph for each new size on that size's first calls (time, and pool memory that grows with the sizes seen);
# this says what skipping them (inductor's `triton.cudagraph_skip_dynamic_graphs`) would cost per call.
VARIANTS["default+anysize"] = {}
# The any-size graph with the UNet's weights channels-last (IMAGESMITH_CHANNELS_LAST=true). Inductor lays a graph
# out channels-last itself only when its convolutions' shapes are static (graph.py's decide_layout_opt, pytorch
# issue 102670), so the any-size graph ran NCHW and cuDNN transposed around each convolution: 2.87 ms of 40.9 ms of
# kernels in run 87. With channels-last weights each convolution's output is channels-last already (eager's rule,
# which the graph keeps), so only the first convolution's input is transposed.
VARIANTS["ro+anysize+cl"] = CUDA_GRAPHS
# The static graph with the weights channels-last. Inductor lays a static graph out channels-last itself, but its
# convolution lowering (kernel/conv.py, `require_channels_last(weight)`, with a TODO to do it once) copies each NCHW
# weight into that layout on every call: base 0.32 B weights of 3x3 convolutions (1.3 GB read and written a call),
# the refiner's 0.78 B (3.1 GB). Weights already channels-last need no copy.
VARIANTS["ro+cl"] = CUDA_GRAPHS
# The any-size graph without CUDA graphs, channels-last as the engine runs it since run 88.
VARIANTS["default+anysize+cl"] = {}
# Three inductor options that act on the Triton kernels run 91 listed, each on the channels-last static graph (the
# engine's default), against `ro+cl` (--peer ro+cl):
# - `triton.prefer_nd_tiling`: 2D tiles for pointwise kernels whose input and output differ in layout. The group
#   norms with SiLU of the up path at 128x128 (a channels-last skip concatenated with an NCHW upsampled tensor, the
#   kernels named `clone`) took 0.9 ms a base call for ~0.25 ms of bytes: a transposing access.
# - `triton.multi_kernel`: each reduction compiled both persistent and looped, the faster kept on its first call.
#   The layer norms of 1280 channels ran looped (`triton_red_`), 10-14 us for ~7 us of bytes.
# - `combo_kernels`: independent kernels horizontally fused into one launch (fewer of the ~1,500 launches).
VARIANTS["ro+cl+ndt"] = {**CUDA_GRAPHS, "triton.prefer_nd_tiling": True}
VARIANTS["ro+cl+mk"] = {**CUDA_GRAPHS, "triton.multi_kernel": 1}
VARIANTS["ro+cl+combo"] = {**CUDA_GRAPHS, "combo_kernels": True}
VARIANTS["ro+cl+mk+ndt"] = {**VARIANTS["ro+cl+mk"], **VARIANTS["ro+cl+ndt"]}
# What a variant's name says beyond its options: the UNet it compiles, and how.
REGION_VARIANTS = {name for name in VARIANTS if "+regions" in name}
ANY_SIZE_VARIANTS = {name for name in VARIANTS if "+anysize" in name}
CHANNELS_LAST_VARIANTS = {name for name in VARIANTS if "cl" in name.split("+")}


def build_unet(which: str, size: str, device: str, dtype: torch.dtype) -> Any:
    """The SDXL UNet (`base` or `refiner`) with random weights from seed 0, QKV fused, as the engine holds it."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet: Any = UNet2DConditionModel(**architecture(size)[which][UNET_KEY])
    unet.eval().requires_grad_(False).to(dtype)
    unet.fuse_qkv_projections()
    unet.requires_grad_(False)  # the fused layers are new, made requiring grad
    return unet


def compiled_call(
    unet: Any, options: dict[str, Any], inputs: dict[str, Any], any_size: bool = False
) -> Callable[[], torch.Tensor]:
    """One UNet call through its own torch.compile: fullgraph, static shapes, as the engine's one-image graph
    at a warmed-up size; `any_size`: the latents' height and width marked dynamic (the graph for other sizes)."""
    compiled = torch.compile(unet, fullgraph=True, dynamic=None if any_size else False, options=options)

    def call() -> torch.Tensor:
        if any_size:
            for dim in (2, 3):
                torch._dynamo.maybe_mark_dynamic(inputs["sample"], dim)
        # A new "step" for the CUDA-graph trees: the previous replay's output may be overwritten.
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            output: torch.Tensor = compiled(**inputs, return_dict=False)[0]
        return output

    return call


def call_times_ms(call: Callable[[], object], repeats: int, cuda: bool) -> list[float]:
    """Each call's milliseconds: on the GPU between CUDA events, else on the host clock (the smoke run)."""
    if cuda:
        return event_times_ms(call, repeats)
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1e3)
    return samples


def alternate(
    calls: Mapping[str, Callable[[], object]], rounds: int, per_round: int, cuda: bool
) -> dict[str, Any]:
    """Time the calls in turn, `rounds` times `per_round` calls each, so a drift in clock or temperature falls on
    all of them alike; each one's median, and its median difference from the peer's over the rounds."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    round_medians: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times = call_times_ms(call, per_round, cuda)
            samples[name] += times
            round_medians[name].append(statistics.median(times))
    table: dict[str, Any] = {}
    for name in calls:
        row: dict[str, Any] = {"median_ms": round(statistics.median(samples[name]), 3)}
        row["min_ms"], row["max_ms"] = round(min(samples[name]), 3), round(max(samples[name]), 3)
        if name != PEER and PEER in calls:
            paired = [a - b for a, b in zip(round_medians[name], round_medians[PEER], strict=True)]
            row["vs_peer_ms_by_round"] = [round(d, 3) for d in paired]
            row["vs_peer_ms"] = round(statistics.median(paired), 3)
        table[name] = row
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--unet", default="base", choices=("base", "refiner"))
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="names from VARIANTS; the peer runs first"
    )
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds at the end")
    parser.add_argument("--per-round", type=int, default=5, help="calls per variant in a round")
    parser.add_argument("--profile", action="store_true", help="also each variant's GPU time by kernel kind")
    parser.add_argument(
        "--profile-top",
        type=int,
        default=10,
        help="with --profile, the longest kernels listed (by name); 1000 lists them all, e.g. to look for "
        "per-call work like run 89's weight copies in the Triton time",
    )
    parser.add_argument(
        "--peer",
        default="ro",
        help="the variant the others are timed and compared against (ro+cl: the engine's default since run 89)",
    )
    parser.add_argument(
        "--first",
        help="the variant compiled first (default: the peer). Later compiles reuse the Triton kernels earlier "
        "ones built in this process, so only the first compile is a cold one",
    )
    parser.add_argument(
        "--fresh-cache",
        action="store_true",
        help="inductor's on-disk cache in a new empty folder, so the first compile is cold even on a machine "
        "that ran this before",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="toy UNet on the CPU, fp32: proves the code path"
    )
    args = parser.parse_args(argv)
    wanted = [name for name in args.variants.split(",") if name]
    unknown = [name for name in wanted if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    global PEER
    PEER = args.peer
    if PEER not in VARIANTS:
        parser.error(f"--peer: unknown {PEER!r}; known: {', '.join(VARIANTS)}")
    # The peer first unless --first says otherwise: the others are timed against it as they compile.
    first = args.first or PEER
    if first not in VARIANTS:
        parser.error(f"--first: unknown {first!r}; known: {', '.join(VARIANTS)}")
    names = list(dict.fromkeys([first, PEER, *wanted]))
    if args.fresh_cache:
        import os
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")
    cuda = not args.smoke
    if cuda and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    latent = LATENT if cuda else 16
    size = "smoke" if args.smoke else "full"
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    # Every variant is a graph of the same code object (UNet2DConditionModel.forward); dynamo's default limit of
    # graphs per code object (8) would do, but say so rather than depend on it.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4 * len(VARIANTS))
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "torch": torch.__version__,
        "unet": args.unet,
        "shape": f"{ROWS} rows x {latent}x{latent} latents",
        "variants": {name: VARIANTS[name] for name in names},
        "compiled": {},
        "against_peer_after_compile": {},
    }

    def save() -> None:
        Path(args.out).write_text(json.dumps(results, indent=1))

    torch.manual_seed(1)
    unet = build_unet(args.unet, size, device, dtype)
    inputs = unet_inputs(unet, ROWS, latent, device, dtype)
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name in names:
        variant_unet = unet if name == PEER else build_unet(args.unet, size, device, dtype)
        if name in REGION_VARIANTS:
            compile_transformer_blocks_once(variant_unet)
        if name in CHANNELS_LAST_VARIANTS:
            variant_unet.to(memory_format=torch.channels_last)  # what the engine's channels_last setting does
        call = compiled_call(variant_unet, VARIANTS[name], inputs, any_size=name in ANY_SIZE_VARIANTS)
        began = time.perf_counter()
        try:
            call()  # dynamo traces, inductor compiles (and autotunes), the CUDA-graph trees warm up
            if cuda:
                torch.cuda.synchronize()
        # An option this torch lacks, or a lowering it cannot do: the others still run.
        except Exception as error:
            if name == PEER:
                raise
            results["compiled"][name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"{name}: failed to compile: {results['compiled'][name]['error']}", flush=True)
            save()
            continue
        compile_s = time.perf_counter() - began
        for _ in range(2):  # the trees record the graph on a later call; replays from then on
            call()
        outputs[name] = call().clone()
        calls[name] = call
        results["compiled"][name] = {
            "compile_s": round(compile_s, 1),
            "finite": bool(torch.isfinite(outputs[name]).all()),
            # Whether the compile was a cold one: on a machine that ran this before, inductor's cache (and its
            # autotuning results) under /tmp make a variant's second compile quick; the counts are cumulative.
            "fxgraph_cache_so_far": {
                kind: counters["inductor"][f"fxgraph_cache_{kind}"] for kind in ("hit", "miss")
            },
        }
        if PEER in calls:
            # Each variant against the peer as soon as both exist (a variant compiled before the peer, with
            # --first, once the peer has compiled), so a call that runs out of time keeps these rows.
            for done in calls:
                if "rel_l2_vs_peer" not in results["compiled"][done]:
                    results["compiled"][done]["rel_l2_vs_peer"] = round(
                        relative_l2(outputs[done], outputs[PEER]), 6
                    )
                if done != PEER and done not in results["against_peer_after_compile"]:
                    results["against_peer_after_compile"][done] = alternate(
                        {PEER: calls[PEER], done: calls[done]}, rounds=3, per_round=args.per_round, cuda=cuda
                    )[done]
        if args.profile and cuda:
            results["compiled"][name]["profile"] = profile_kinds(call, images=1, top=args.profile_top)
        print(f"{name}: compiled in {compile_s:.1f}s, {results['compiled'][name]}", flush=True)
        save()
    results["round_robin"] = alternate(calls, args.rounds, args.per_round, cuda)
    save()
    print(f"\n{results['gpu']}, torch {results['torch']}; {args.unet} UNet, {results['shape']}, ms per call")
    print(f"| variant | compile s | call ms (range) | against {PEER}, ms | rel. L2 against {PEER} |")
    print("|---|---|---|---|---|")
    for name in calls:
        row, built = results["round_robin"][name], results["compiled"][name]
        versus = f"{row['vs_peer_ms']:+.2f}" if "vs_peer_ms" in row else "peer"
        print(
            f"| {name} | {built['compile_s']} | {row['median_ms']:.2f} ({row['min_ms']:.2f}-{row['max_ms']:.2f}) "
            f"| {versus} | {built['rel_l2_vs_peer']:.2e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
