"""The fast path on one GPU, in one run: diffusers' fp16 peer vs the eager engine vs the engine's speed levers.

Phases (`--phases`, each skipped, and said so, when the time budget runs short; results saved after each):
  seed       the seed document's settings: plain diffusers fp32, base 50 steps to latents, then the refiner as
             img2img, 30 steps at strength 0.3, guidance 8, negative prompt "", the refiner with its own copies
             of text_encoder_2 and the VAE (the seed's two from_pretrained calls)
  peer       diffusers' documented fp16 ensemble, 40 steps, split 0.8 (plain pipelines): the headline's peer
  eager      imagesmith's default (bf16 everywhere, eager), ensemble 40 steps, 0.8; keeps the final latents and
             image as the fidelity reference for every variant (same weights: the builder is seeded)
  mlperf     the MLPerf setting eager (base only, 20 steps, guidance 8, 1024x1024) at `--mlperf-batches`
  variants   each of `--variants` on fresh components (levers change modules in place): levers applied as
             Engine.start applies them, warm-up timed (compilation: the first start's cost, or the cache's),
             then the 40-step ensemble, fidelity against eager (relative L2 of the final latents, PSNR)
  restart    dynamo reset, then the last variant's warm-up again: the second start, from the inductor cache

Every phase records the median and spread of `--runs` end-to-end runs, the peak GPU memory, each UNet's median
call time on the GPU and its achieved TFLOP/s (unet_timeline.py: CUDA events around every call, compiled or
not), and `first_image_s`: from the phase's start (building its modules, which a user's process loads from disk)
to its first image, the warm-up (compilation) included.

A variant is
`MODE[+fp8|+fp8dyn][+fp8conv|+fp8convnchw][+geglu][+bgeglu][+cl][+cudnn|+nocudnn][+dyn][+regions][+teg|+noteg][+attn-BACKEND][+olddecode][+cdt][+mk][+ndt][+zu][:mlperf]`:
MODE is a compile choice (off, default, reduce-overhead, max-autotune-no-cudagraphs); +fp8 fp8 transformer linears
(engine/fp8.py) with static scales, calibrated as Engine.start does (the default), +fp8dyn with dynamic ones; +fp8conv (with +fp8)
the convolutions in fp8 too (IMAGESMITH_FP8_CONVS, cuDNN's kernels), +fp8convnchw the same with inductor's layout
heuristic left alone (run 52's: NCHW, the peer); +geglu (with +fp8) the feed-forwards' GEGLU fused into
their first fp8 matmul (IMAGESMITH_FP8_FUSED_GEGLU, a Triton kernel); +bgeglu (without +fp8) the same for
bf16 feed-forwards (IMAGESMITH_FUSED_GEGLU, engine/bf16_geglu.py; the service's default with compile on a
Hopper GPU since run 98, but without +bgeglu a variant runs it off, as every run before 98 did); +cl the UNets'
weights channels-last (without it a variant runs them NCHW, as every run before 89 did; the engine's default with
compile since run 90 is channels-last, so `reduce-overhead+cl+bgeglu` is what a service runs on a Hopper GPU, and
with +mk the fastest exact mode);
+cudnn / +nocudnn IMAGESMITH_CUDNN_BENCHMARK on or off (settings refuse it on with the CUDA-graph modes;
unless named: off until run 49, the settings' default since run 50, i.e. on with compile `default`); +dyn the UNets compiled with
dynamic shapes (IMAGESMITH_COMPILE_DYNAMIC); +regions each kind of transformer block compiled once
(IMAGESMITH_COMPILE_REGIONS; variants in one process share inductor's kernels, so its cold compile is
unet_compiled.py's `--first ro+regions --fresh-cache`); +teg / +noteg the text encoders replayed as CUDA graphs or not
(IMAGESMITH_TEXT_ENCODER_GRAPHS; the settings' default unless named: on with the CUDA-graph modes); +attn-cudnn (or -flash,
-efficient) the attention kernel tried first (IMAGESMITH_ATTENTION_BACKEND; torch's order unless named); +olddecode
the decode as it was before run 49, the peer of today's (a decoder compiled in the UNets' mode, CUDA graphs
included; each image checked and converted on the host in turn); +cdt inductor's coordinate-descent tuning of its
own kernels (normalisations, elementwise: ~40 ms of a ~189 ms fp8 base call at batch 16; not a setting yet); +mk
IMAGESMITH_TIMED_REDUCTIONS (inductor's multi-kernel: each reduction persistent or looped, the faster kept); +ndt
inductor's `triton.prefer_nd_tiling` (2D tiles for pointwise kernels that transpose; not a setting); +zu the base
UNet's cross-attentions on the guided rows only, the others (an empty negative prompt's zeros) given their exact
output, the projection's bias (IMAGESMITH_EMPTY_NEGATIVE_SHORTCUT, engine/empty_negative.py; run 115 measured its
prototype, benchmarks/zero_uncond.py then, run 116 the engine's; on in the engine by default since session 49, but
a variant without +zu runs without it; not with :mlperf); `:mlperf`
measures the MLPerf setting instead of the ensemble (base UNet and VAE only; warm-up at batch 1 then the
largest batch, as the service's warm-up does).

An MLPerf row records 3 batches' times and the base UNet's own call time on the GPU; `--ab pin,noise,...` first
runs same-process A/Bs of the exact host changes, peer and engine batches alternating (host_peers.py),
`--queue-jobs N` then sends N jobs through the service's queue on the same warm engine (imagesmith/jobs/queue_timing.py: the
service's figure at that batch without the service's ~10-minute cold start of the fp8 levers), `--idle-profile`
then profiles two batches for where the GPU waits (gpu_idle.py), `--idle-stacks` two more with
Python's functions (two, so the hole between passes is among them).

Usage:  PYTHONPATH=src python benchmarks/fast_path.py --out DIR [--budget-s 540] [--smoke] \
            [--phases peer,eager,variants] [--variants default,reduce-overhead]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_idle import print_idle, profile_idle
from host_peers import alternating_ab, peers_for
from sdxl_random import architecture, build_components, build_pipelines, run_two_stage
from unet_timeline import UnetTimeline

from imagesmith.jobs.queue_timing import request_bodies, through_queue

PROMPT = "a lighthouse on a rocky cliff at sunset, dramatic sky, photograph"
UNET_TFLOP = {"base": 13.522, "refine": 14.572}  # per call, batch 2 with CFG, 128x128 latents (reference)
# --queue-ab: the service settings an A/B of the queue changes, one each (each is exact: the images are the
# same; what moves is where the host's work sits against the GPU's passes).
# no-encode-ahead: the next pass's prompts encoded by that pass, not between this one's steps; finish-inline: each
# pass's PNGs written before the next pass starts; hand-over-first: each pass handed to the finishing thread before
# the next pass's claim (the order before session 35).
QUEUE_AB: dict[str, dict[str, Any]] = {
    "hand-over-first": {"claim_before_hand_over": False},
    "no-encode-ahead": {"encode_ahead": False},
    "finish-inline": {"finish_in_background": False},
    "no-previews": {"preview_every": 0},
}


@dataclass(frozen=True)
class Variant:
    spec: str
    mode: str
    fp8: bool
    channels_last: bool
    cudnn_benchmark: bool | None  # None: the settings' default
    mlperf: bool
    attention: str = "auto"
    dynamic: bool = False
    text_encoder_graphs: bool | None = None  # None: the settings' default (on with the CUDA-graph modes)
    fp8_scales: str = "static"  # with fp8: IMAGESMITH_FP8_SCALES
    old_decode: bool = False
    fp8_convs: bool = False  # with +fp8: the convolutions too (IMAGESMITH_FP8_CONVS)
    fp8_convs_nchw: bool = False  # +fp8convnchw: as run 52 measured them, the layout left to inductor (NCHW)
    coordinate_descent: bool = False  # +cdt: torch._inductor.config.coordinate_descent_tuning
    fused_geglu: bool = False  # +geglu: with +fp8, IMAGESMITH_FP8_FUSED_GEGLU
    regions: bool = False  # +regions: IMAGESMITH_COMPILE_REGIONS
    timed_reductions: bool = False  # +mk: IMAGESMITH_TIMED_REDUCTIONS
    nd_tiling: bool = False  # +ndt: torch._inductor.config.triton.prefer_nd_tiling
    bf16_fused_geglu: bool = False  # +bgeglu: IMAGESMITH_FUSED_GEGLU (bf16 feed-forwards)
    guided_rows_only: bool = False  # +zu: IMAGESMITH_EMPTY_NEGATIVE_SHORTCUT (engine/empty_negative.py)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        body, _, kind = spec.partition(":")
        mode, *flags = body.split("+")
        attention = [flag.removeprefix("attn-") for flag in flags if flag.startswith("attn-")]
        known = {
            "fp8",
            "fp8dyn",
            "cl",
            "cudnn",
            "nocudnn",
            "dyn",
            "teg",
            "noteg",
            "attn-flash",
            "attn-efficient",
            "attn-cudnn",
            "attn-fa4",
            "olddecode",
            "fp8conv",
            "fp8convnchw",
            "cdt",
            "geglu",
            "bgeglu",
            "regions",
            "mk",
            "ndt",
            "zu",
        }
        unknown = set(flags) - known
        twice = any(
            pair <= set(flags) for pair in ({"teg", "noteg"}, {"fp8", "fp8dyn"}, {"cudnn", "nocudnn"})
        )
        convs = {"fp8conv", "fp8convnchw"} & set(flags)
        twice = twice or len(convs) > 1 or bool((convs or "geglu" in flags) and "fp8" not in flags)
        twice = twice or bool("bgeglu" in flags and ("fp8" in flags or "fp8dyn" in flags))
        # Regions shape a compile (not mode off), and settings refuse them with every size dynamic.
        twice = twice or ("regions" in flags and (mode == "off" or "dyn" in flags))
        twice = twice or bool("zu" in flags and kind == "mlperf")  # MLPerf's prompts have a negative prompt
        if unknown or kind not in ("", "mlperf") or len(attention) > 1 or twice:
            raise SystemExit(
                f"variant {spec!r}: flags are one of +fp8 +fp8dyn, +cl +dyn, one of +cudnn +nocudnn, one of +teg +noteg, one of "
                "+attn-flash +attn-efficient +attn-cudnn +attn-fa4, +olddecode, +cdt, +mk, +ndt, +zu (not :mlperf), "
                "+regions (compiled, not with +dyn), "
                "one of +fp8conv +fp8convnchw (with +fp8), +geglu (with +fp8), +bgeglu (without fp8), "
                "and the suffix :mlperf"
            )
        return cls(
            spec,
            mode,
            "fp8" in flags or "fp8dyn" in flags,
            "cl" in flags,
            True if "cudnn" in flags else False if "nocudnn" in flags else None,
            kind == "mlperf",
            attention[0] if attention else "auto",
            dynamic="dyn" in flags,
            text_encoder_graphs=True if "teg" in flags else False if "noteg" in flags else None,
            fp8_scales="dynamic" if "fp8dyn" in flags else "static",
            old_decode="olddecode" in flags,
            fp8_convs=bool(convs),
            fp8_convs_nchw="fp8convnchw" in flags,
            coordinate_descent="cdt" in flags,
            fused_geglu="geglu" in flags,
            regions="regions" in flags,
            timed_reductions="mk" in flags,
            nd_tiling="ndt" in flags,
            bf16_fused_geglu="bgeglu" in flags,
            guided_rows_only="zu" in flags,
        )


def decode_one_by_one(
    vae: Any,
    latents: torch.Tensor,
    dtype: torch.dtype,
    tiling: bool,
    device: Any,
    host: Any = None,  # the engine's pinned pixel buffer (engine/host_pixels.py): not used before run 49
) -> tuple[list[Any], list[bool]]:
    """engine/decode.py's decode_latents before run 49 (the `+olddecode` peer): each image decoded, checked (two
    waits for the GPU) and converted on the host in turn, the GPU idle meanwhile. Its check and conversion are
    the old code's own, kept here since run 50: runs 49-50 took them from engine/decode.py, already changed."""
    from PIL import Image

    from imagesmith.engine.decode import _decode_once

    vae.enable_tiling() if tiling else vae.disable_tiling()
    images, retried = [], []
    with torch.no_grad():
        for one in latents.split(1):
            image = _decode_once(vae, one, dtype, torch.device(device))
            if not torch.isfinite(image).all() or (image.float() / 2 + 0.5).clamp(0, 1).amax() < 1.0 / 255:
                raise RuntimeError("a broken decode: the peer has no fp32 retry")
            array = (image.float().squeeze(0) / 2 + 0.5).clamp(0, 1).nan_to_num(0.0)
            pixels = (array.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            images.append(Image.fromarray(pixels))
            retried.append(False)
    return images, retried


@contextlib.contextmanager
def decode_as_before(engine: Any, settings: Any) -> Any:
    """The engine's decode as before run 49, for the block: the decoder compiled in the UNets' own mode (CUDA
    graphs with reduce-overhead) and decode_one_by_one."""
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    import imagesmith.engine.engine as engine_module
    from imagesmith.engine.decoder_attention import processors_kept
    from imagesmith.engine.fast import unet_compile_options

    decoder = engine.models.base.vae.decoder
    # Before run 49 the decoder's attention ran in a fused kernel: diffusers' own processors, not the routed one.
    with processors_kept(decoder) as blocks:
        for block in blocks:
            fused = getattr(block, "fused_projections", False)
            plain: Any = (
                FusedAttnProcessor2_0() if fused else AttnProcessor2_0()
            )  # diffusers types it AttnProcessor
            block.set_processor(plain)
        if decoder._compiled_call_impl is not None:
            decoder._compiled_call_impl = None
            decoder.compile(fullgraph=True, mode=unet_compile_options(settings)["mode"])
        current = engine_module.decode_latents
        engine_module.decode_latents = decode_one_by_one
        try:
            yield
        finally:
            engine_module.decode_latents = current


def encoder_graphs_report(engine: Any) -> dict[str, Any]:
    """Each graphed text encoder: recorded or failed (and why), its replays, and whether a replay gives bit for
    bit what its eager forward gives for this benchmark's prompt (the claim engine/encoder_graphs.py makes)."""
    from imagesmith.engine.encoder_graphs import installed

    base = engine.models.base
    report: dict[str, Any] = {}
    for name, tokenizer in (("text_encoder", base.tokenizer), ("text_encoder_2", base.tokenizer_2)):
        encoder = getattr(base, name)
        graph = installed(encoder)
        if graph is None:
            continue
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids = ids.input_ids.to(encoder.device)
        with torch.no_grad():
            replayed = encoder(ids, output_hidden_states=True)
            eager = graph.eager_forward(ids, output_hidden_states=True)
        report[name] = {
            "recorded": graph.graph is not None,
            "failure": graph.failure,
            "replays": graph.replays,
            "bit_identical_to_eager": bool(
                torch.equal(replayed[0], eager[0])
                and torch.equal(replayed.hidden_states[-2], eager.hidden_states[-2])
            ),
        }
    return report


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.started = args, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"skipped": {}, "errors": {}, "variants": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        (self.out / "fast_path.json").write_text(json.dumps(self.results, indent=1, default=str))

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def phase(self, name: str, needs_s: float, body: Any) -> None:
        left = self.args.budget_s - self.elapsed()
        if left < needs_s:
            self.results["skipped"][name] = f"{left:.0f}s left, needs about {needs_s:.0f}s"
            self.log(f"SKIP {name}")
            return
        self.log(f"phase {name}")
        try:
            body()
        except Exception as error:  # one failed phase must not lose the others
            self.results["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
            traceback.print_exc()
        self.save()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Any, runs: int) -> dict[str, Any]:
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": times}


class UnetRates:
    """Each UNet's calls on the GPU (unet_timeline.py) -> calls, median ms a call, achieved TFLOP/s. The FLOPs
    a call are the reference's (batch 2 with CFG, 128x128 latents), so the rate means something at 1024x1024
    with guidance only, which every configuration here uses."""

    def __init__(self, base_unet: torch.nn.Module, refiner_unet: torch.nn.Module | None) -> None:
        self.timelines = {"base": UnetTimeline(base_unet)}
        if refiner_unet is not None:
            self.timelines["refine"] = UnetTimeline(refiner_unet)

    def discard(self) -> None:
        """Forget the calls so far (a warm-up's)."""
        for timeline in self.timelines.values():
            timeline.take()

    def take(self, images: int = 1) -> dict[str, Any]:
        """`images`: each call's images (a batch of 8 at the MLPerf setting runs 8x the reference's FLOPs; runs
        62-63 recorded 1/8 of the rate for want of it)."""
        rates: dict[str, Any] = {}
        for role, timeline in self.timelines.items():
            calls = timeline.take()
            ms = calls.get("unet_gpu_ms_median")
            if ms:
                rates[role] = {
                    "calls": calls["unet_calls"],
                    "gpu_ms_median": ms,
                    "tflop_s": images * UNET_TFLOP[role] / ms * 1e3,
                    # the GPU's time between two steps' calls (the scheduler's kernels, any wait for the host)
                    "step_gap_ms_median_p90_max": calls.get("gpu_gap_ms_median_p90_max"),
                }
        return rates


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((image - reference) ** 2))
    return 10 * float(np.log10(255**2 / mse)) if mse else float("inf")


def profile_generation(engine: Any, request: Any) -> dict[str, Any]:
    """One generation under the profiler: wall time, the GPU kernel time by kind (kernels inside CUDA graphs
    are recorded too), and when the CPU finished queueing each base step. If the kernels add up to much less
    than the wall time, the GPU waited on the host."""
    from attention_backends import kernel_time_by_kind, longest_first
    from torch.profiler import ProfilerActivity, profile

    queued: list[float] = []
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        began = time.perf_counter()
        engine.generate(
            request,
            on_progress=lambda event: (
                queued.append(time.perf_counter() - began) if event.stage != "decode" else None
            ),
        )
        sync()
        wall = time.perf_counter() - began
    by_kind, kernels = kernel_time_by_kind(prof, name_chars=90)
    step_gaps = [round((b - a) * 1000, 1) for a, b in itertools.pairwise(queued)]
    return {
        "wall_ms": wall * 1000,
        "kernel_ms": sum(by_kind.values()) / 1000,
        "by_kind_ms": {kind: round(us / 1000, 1) for kind, us in longest_first(by_kind)},
        "top_kernels_ms": [(name, us / 1000) for name, us in longest_first(kernels)[:8]],
        "cpu_ms_between_step_callbacks": step_gaps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "fast-path-out"))
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, to prove the code path")
    parser.add_argument("--phases", default="peer,eager,mlperf,variants")
    parser.add_argument("--variants", default=None, help="with the phase 'variants' (default: default)")
    parser.add_argument("--mlperf-batches", default="")
    parser.add_argument("--cache-dir", default="", help="inductor cache (default OUT/data/compile-cache)")
    parser.add_argument(
        "--prompt-cache",
        action="store_true",
        help="keep the engine's prompt-embedding cache on; off by default because every timed run repeats one "
        "prompt, so the cache would skip the text encoders that the peer runs each time (runs 6-23 had it on)",
    )
    parser.add_argument(
        "--no-prompt-cache-ab",
        dest="prompt_cache_ab",
        action="store_false",
        help="skip timing eager and each variant again with the prompt cache on (saves ~10 runs a phase)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one ensemble per variant: GPU kernel time by kind"
    )
    parser.add_argument(
        "--ab",
        default="",
        help="comma-separated same-process A/Bs run before an MLPerf row's own batches, each against a peer that "
        "undoes one exact host change (benchmarks/host_peers.py): pin (the execution devices searched), noise "
        "(diffusers' starting noise), host (run 66b's host: encoders searched, diffusers' noise), pixels (fresh "
        "host memory for the decoded pixels, engine/host_pixels.py's peer), stagesync (each stage's end waiting "
        "for the GPU, engine/stage_clock.py's peer), threads "
        "(torch's CPU thread count; only where the plan changed it)",
    )
    parser.add_argument(
        "--queue-jobs",
        type=int,
        default=0,
        help="MLPerf rows: also this many jobs through the service's queue (store, worker, files) at "
        "batch_max_images = the batch, on the warm engine (imagesmith/jobs/queue_timing.py); 0: none",
    )
    parser.add_argument(
        "--queue-ab",
        default="",
        help="with --queue-jobs: comma-separated queue A/Bs, each a row with one service setting changed against "
        f"the default's, twice, alternating ({', '.join(f'{k}: {v}' for k, v in QUEUE_AB.items())})",
    )
    parser.add_argument(
        "--ab-rounds",
        type=int,
        default=8,
        help="alternating peer/engine batch pairs per A/B (runs 66-68: 3+3)",
    )
    parser.add_argument(
        "--idle-stacks",
        action="store_true",
        help="after a row's runs (MLPerf or ensemble), profile two batches with Python's functions: what fills each GPU hole",
    )
    parser.add_argument(
        "--idle-profile",
        action="store_true",
        help="after a row's runs (MLPerf or ensemble), profile two more batches: where the GPU waits (gpu_idle.py)",
    )
    parser.add_argument(
        "--compile-needs-s", type=float, default=240, help="budget a variant needs (a cold compile)"
    )
    args = parser.parse_args()
    torch_threads_at_start = torch.get_num_threads()  # before any engine lowers it: the threads A/B's peer
    ab_names = [name for name in args.ab.split(",") if name]
    queue_ab = [name for name in args.queue_ab.split(",") if name]
    if unknown_ab := [name for name in queue_ab if name not in QUEUE_AB]:
        parser.error(f"--queue-ab: unknown {unknown_ab}; known: {', '.join(QUEUE_AB)}")
    if queue_ab and not args.queue_jobs:
        parser.error("--queue-ab needs --queue-jobs N (the queue rows it compares)")
    run = Run(args)
    smoke = args.smoke
    phases = set(args.phases.split(","))
    if args.variants is not None and "variants" not in phases:
        # Run 46 lost its fp8 A/B this way: --phases mlperf with --variants ran nothing and said "skipped: {}".
        raise SystemExit(
            f"--variants {args.variants} given, but --phases {args.phases} has no 'variants': add it"
        )
    variants = [Variant.parse(spec) for spec in (args.variants or "default").split(",") if spec]
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    px, steps, mlperf_steps = (64, 4, 3) if smoke else (1024, 40, 20)
    mlperf_batches = [int(b) for b in args.mlperf_batches.split(",") if b] or ([1, 2] if smoke else [1, 4, 8])

    from imagesmith.config import Settings
    from imagesmith.engine.cudnn_graphs import plan_reports
    from imagesmith.engine.engine import BatchItem, Engine
    from imagesmith.engine.fast import warm_up
    from imagesmith.engine.hardware import plan_hardware, probe_device
    from imagesmith.engine.models import LoadedModels, ModelSources
    from imagesmith.engine.prompt_cache import PromptEmbeddingCache
    from imagesmith.schemas import GenerationRequest

    plan = plan_hardware(probe_device(device), Settings())
    run.results["plan"] = plan.summary()
    run.results["torch_cpu_threads_at_start"] = torch_threads_at_start
    run.results["versions"] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
        "cudnn": torch.backends.cudnn.version(),
    }
    with contextlib.suppress(ImportError):
        run.results["versions"]["torchao"] = __import__("torchao").__version__
    arch = architecture("smoke" if smoke else "full")

    def ensemble_request(seed: int = 1, prompt: str = PROMPT) -> GenerationRequest:
        return GenerationRequest(prompt=prompt, width=px, height=px, num_inference_steps=steps, seed=seed)

    def mlperf_request(image: int = 0) -> GenerationRequest:
        # A prompt of its own for each image of a batch, as MLPerf's captions are: a batch of one repeated prompt
        # encodes it once per pass (runs 8-16 did), where distinct prompts run the text encoders for every image.
        return GenerationRequest(
            prompt=f"{PROMPT}, image {image}",
            width=px,
            height=px,
            num_inference_steps=mlperf_steps,
            guidance_scale=8.0,
            refine_mode="none",
            seed=7,
        )

    # --- plain diffusers: the seed's settings and the peer a user would write ------------------------------
    def plain_two_stage(
        base: Any, refiner: Any, base_steps: int, base_kwargs: dict[str, Any], refine_kwargs: dict[str, Any]
    ) -> Any:
        """One plain-diffusers generation at this run's size (sdxl_random.run_two_stage)."""
        base_args = {"width": px, "height": px, "num_inference_steps": base_steps, **base_kwargs}

        def once() -> None:
            run_two_stage(base, refiner, PROMPT, base_args, refine_kwargs)

        return once

    def measure_plain(key: str, components: Any, once: Any, began: float) -> None:
        rates = UnetRates(components.base_unet, components.refiner_unet)
        once()
        first_image_s = time.perf_counter() - began
        rates.discard()
        reset_peak()
        stats = timed(once, args.runs)
        run.results[key] = {
            **stats,
            "peak_gib": peak_gib(),
            "first_image_s": first_image_s,
            "unet": rates.take(),
        }
        run.log(
            f"{key}: median {stats['median_s']:.3f}s, first image {first_image_s:.1f}s after the phase began"
        )

    def seed() -> None:
        began = time.perf_counter()
        components = build_components(arch, device)  # fp32, as the seed runs on a large GPU
        base, refiner = build_pipelines(components, separate_refiner_copies=True)
        seed_steps, refine_steps = (5, 4) if smoke else (50, 30)
        # The seed passes guidance 8 and an empty negative prompt to both stages.
        common = {"guidance_scale": 8.0, "negative_prompt": ""}
        refine = {"num_inference_steps": refine_steps, "strength": 0.3, **common}
        measure_plain(
            "seed_fp32", components, plain_two_stage(base, refiner, seed_steps, common, refine), began
        )

    if "seed" in phases:
        run.phase("seed", 120, seed)
        release_memory()

    def peer() -> None:
        began = time.perf_counter()
        components = build_components(arch, device)
        components.to(torch.float16)
        base, refiner = build_pipelines(components)
        ensemble = plain_two_stage(
            base,
            refiner,
            steps,
            {"denoising_end": 0.8},
            {"num_inference_steps": steps, "denoising_start": 0.8},
        )
        measure_plain("peer_fp16_ensemble", components, ensemble, began)

    if "peer" in phases:
        run.phase("peer", 60, peer)
        release_memory()

    def new_engine(with_refiner: bool = True, engine_plan: Any = plan) -> Any:
        components = build_components(arch, device)
        components.to(plan.dtype, plan.vae_dtype)
        base, refiner = build_pipelines(components)
        # Without a refiner (the MLPerf variants), its UNet goes with this frame: nothing else refers to it.
        models = LoadedModels(
            base, refiner if with_refiner else None, None, ModelSources("random-full", "random-full", None)
        )
        return Engine(models, engine_plan, prompt_cache_size=64 if args.prompt_cache else 0)

    reference: dict[str, Any] = {}

    def final_latents_of(engine: Any, request: GenerationRequest) -> tuple[torch.Tensor, np.ndarray]:
        captured: list[torch.Tensor] = []
        # The denoising steps' latents; the decode's events (since session 48) carry none.
        result = engine.generate(
            request, on_progress=lambda e: captured.append(e.latents) if e.latents is not None else None
        )
        return captured[-1].float().cpu(), np.asarray(result.images[0]).astype(np.float64)

    def stages_of(result: Any) -> list[tuple[str, int, float]]:
        return [(s.name, s.steps, round(s.seconds, 4)) for s in result.metadata.stages]

    def median_stage_s(results: list[Any]) -> dict[str, float]:
        """Each stage's median seconds over passes (one generate_batch's results each)."""
        seconds: dict[str, list[float]] = {}
        for outcomes in results:
            for stage in outcomes[0].metadata.stages:
                seconds.setdefault(stage.name, []).append(stage.seconds)
        return {name: round(statistics.median(values), 4) for name, values in seconds.items()}

    def host_abs(engine: Any, fn: Any, images: int, label: str) -> dict[str, Any]:
        """The --ab peers against the warm engine, `fn` (one batch of `images`) timed in alternating rounds."""
        rows = {
            name: alternating_ab(fn, peer, args.ab_rounds, images)
            for name, peer in peers_for(engine, ab_names, torch_threads_at_start).items()
        }
        for name, ab in rows.items():
            run.log(
                f"{label}: A/B '{name}', {ab['rounds']} alternating rounds: peer {ab['peer_median_s']:.3f} s "
                f"({ab['peer_images_per_s']:.3f} images/s), engine {ab['engine_median_s']:.3f} s "
                f"({ab['engine_images_per_s']:.3f}), {ab['engine_minus_peer_ms']:+.1f} ms"
            )
        return rows

    def mlperf_rows(
        engine: Any,
        label: str,
        batch_sizes: list[int],
        rates: UnetRates,
        rows: dict[str, Any],
        settings: Settings,
    ) -> dict[str, Any]:
        """Fills `rows`, already in run.results, so each save holds the batches measured so far (through run 65
        a row was attached only when all were done). `rates` times the base UNet's own calls on the GPU (CUDA
        events around each): a kernel-level A/B's figure, which the batch time mixes with the decode and the
        host (run 59's fused GEGLU could not be told from its host)."""
        for batch in batch_sizes:
            items = [BatchItem(mlperf_request(image)) for image in range(batch)]
            sync()
            t0 = time.perf_counter()
            first = engine.generate_batch(items)  # warm (compiles this batch size when compiled)
            sync()
            first_s = time.perf_counter() - t0
            ab_rows = host_abs(
                engine, functools.partial(engine.generate_batch, items), batch, f"{label} batch {batch}"
            )
            reset_peak()
            rates.discard()
            passes: list[Any] = []
            stats = timed(lambda items=items, passes=passes: passes.append(engine.generate_batch(items)), 3)
            image = np.asarray(first[0].images[0]).astype(np.float64)
            row = {**stats, "images_per_s": batch / stats["median_s"], "peak_gib": peak_gib()}
            row["first_call_s"] = first_s
            row["median_stage_s"] = median_stage_s(passes)
            row["unet"] = rates.take(images=batch)
            if ab_rows:
                row["ab"] = ab_rows
            key = f"mlperf_image_{batch}"
            if key in reference:
                row["psnr_vs_eager_db"] = psnr(image, reference[key])
            else:
                reference[key] = image
            rows[str(batch)] = row
            run.log(
                f"{label} batch {batch}: {row['images_per_s']:.2f} images/s (first call {first_s:.1f}s), "
                f"stages {row['median_stage_s']}, base UNet call {row['unet'].get('base', {}).get('gpu_ms_median')} ms"
            )
            run.save()  # before the profiles: a call cut short in one keeps the row
            if args.queue_jobs:
                row["queue"] = queue_at(engine, settings, batch, f"{label} batch {batch}")
                run.save()
            if args.idle_profile:
                row["gpu_idle"] = profile_idle(functools.partial(engine.generate_batch, items), calls=2)
                print_idle(row["gpu_idle"], f"{label} batch {batch}")
                run.save()
            if args.idle_stacks:
                row["gpu_idle_with_stacks"] = profile_idle(
                    functools.partial(engine.generate_batch, items), calls=2, with_stack=True
                )
                print_idle(row["gpu_idle_with_stacks"], f"{label} batch {batch}, with Python stacks")
                run.save()
        return rows

    def queue_at(engine: Any, settings: Settings, batch: int, label: str) -> dict[str, Any]:
        """--queue-jobs jobs through the service's queue at batch_max_images `batch` on this warm engine, after
        one untimed pass; new prompts (none the engine's batches above used). With --queue-ab, each named
        setting's row against the default's, alternating, after it."""

        def queue_row(changes: dict[str, Any], row_label: str) -> dict[str, Any]:
            # The default batch window, as a service runs: since session 24 it costs nothing when the queue is
            # full (jobs that already waited it, or a full pass, do not wait), which the row then shows.
            row = through_queue(
                engine,
                settings.with_changes(batch_max_images=batch, **changes),
                request_bodies(mlperf_request, 10_000, args.queue_jobs),
                warm_bodies=request_bodies(mlperf_request, 9_000, batch),
            )
            steady = row.get("steady_images_per_s")
            run.log(
                f"{row_label}: through the queue {row['images_per_s']:.3f} images/s ({row['wall_s']:.2f} s for "
                f"{row['jobs']}), steady state {f'{steady:.3f}' if steady else '-'}, passes of "
                f"{row['batch_sizes_seen']}, all succeeded {row['all_succeeded']}, stages {row['median_stage_s']}, "
                f"base stage by pass {row['base_s_by_pass']}, passes {row['pass_s']} s, "
                f"the worker between them {row['between_passes_ms']} ms (its claims {row['claim_ms']} ms; "
                f"an fsync {row['fsync_ms']} ms)"
            )
            return row

        row = queue_row({}, label)
        if queue_ab:
            row["ab"] = {}
        for name in queue_ab:
            # Two rounds of (variant, default) after the default row above: the default's three rows bracket
            # the variant's two, so a drift over the minutes shows as a spread, not as the variant's effect.
            variant_rows, default_rows = [], [row]
            for _ in range(2):
                variant_rows.append(queue_row(QUEUE_AB[name], f"{label}, queue A/B {name}"))
                default_rows.append(queue_row({}, f"{label}, queue A/B default"))
            row["ab"][name] = {
                "changes": QUEUE_AB[name],
                "variant_steady_images_per_s": [r.get("steady_images_per_s") for r in variant_rows],
                "default_steady_images_per_s": [r.get("steady_images_per_s") for r in default_rows],
                "variant_base_s_by_pass": [r["base_s_by_pass"] for r in variant_rows],
                "default_base_s_by_pass": [r["base_s_by_pass"] for r in default_rows],
            }
            run.save()
        return row

    def with_prompt_cache(engine: Any, row: dict[str, Any], label: str) -> None:
        """The same engine timed again with the prompt cache on: the repeated prompt skips the text encoders
        from the second run, a same-run A/B of what runs 6-23 measured with it on."""
        if engine.prompt_cache is not None:
            return
        engine.prompt_cache = PromptEmbeddingCache(64)
        engine.generate(ensemble_request())
        row["with_prompt_cache"] = timed(lambda: engine.generate(ensemble_request()), args.runs)
        # The service's usual case: the cache on, a prompt it has not seen (the empty negative is cached).
        fresh = iter(range(10_000))
        row["with_prompt_cache_new_prompts"] = timed(
            lambda: engine.generate(ensemble_request(prompt=f"{PROMPT}, take {next(fresh)}")), args.runs
        )
        engine.prompt_cache = None
        run.log(
            f"{label}: with the prompt cache {row['with_prompt_cache']['median_s']:.3f}s, "
            f"new prompts {row['with_prompt_cache_new_prompts']['median_s']:.3f}s"
        )

    def eager() -> None:
        began = time.perf_counter()
        engine = new_engine()
        rates = UnetRates(engine.models.base.unet, engine.models.refiner.unet)
        engine.generate(ensemble_request())
        first_image_s = time.perf_counter() - began
        rates.discard()
        reset_peak()
        stats = timed(lambda: engine.generate(ensemble_request()), args.runs)
        row = {**stats, "peak_gib": peak_gib(), "first_image_s": first_image_s, "unet": rates.take()}
        row["stages"] = stages_of(engine.generate(ensemble_request()))
        reference["latents"], reference["image"] = final_latents_of(engine, ensemble_request())
        run.results["engine_eager_ensemble"] = row
        if args.prompt_cache_ab:
            with_prompt_cache(engine, row, "eager")
        if "mlperf" in phases:
            run.results["mlperf_eager"] = {}
            eager_settings = Settings(data_dir=run.out / "data")  # the defaults: eager bf16
            mlperf_rows(
                engine, "mlperf eager", mlperf_batches, rates, run.results["mlperf_eager"], eager_settings
            )

    if "eager" in phases:
        run.phase("eager", 40, eager)
        release_memory()

    last_engine: list[Any] = []

    def measure(variant: Variant) -> None:
        began = time.perf_counter()
        torch._dynamo.reset()  # the previous variant's graphs (and CUDA graph pools) go
        torch.backends.cudnn.benchmark = False  # the settings below switch it on where named or by default
        settings = Settings(
            data_dir=run.out / "data",
            compile_cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            compile=variant.mode,
            fp8=variant.fp8,
            fp8_scales=variant.fp8_scales,
            fp8_convs=variant.fp8_convs,
            fp8_fused_geglu=variant.fused_geglu,
            warmup_sizes=f"{px}x{px}",  # where static fp8 scales are calibrated
            channels_last=variant.channels_last,
            cudnn_benchmark=variant.cudnn_benchmark,
            attention_backend=variant.attention,
            compile_dynamic=variant.dynamic,
            compile_regions=variant.regions,
            timed_reductions=variant.timed_reductions,
            fused_geglu=variant.bf16_fused_geglu,  # off unless named, whatever the settings' default
            empty_negative_shortcut=variant.guided_rows_only,
            text_encoder_graphs=variant.text_encoder_graphs,
        )
        # The plan decides fp8 (row-wise or per-tensor) and the attention kernel, so it is made from this
        # variant's settings, and the engine runs with it.
        variant_plan = plan_hardware(probe_device(device), settings)
        engine = new_engine(with_refiner=not variant.mlperf, engine_plan=variant_plan)
        inductor_config.force_layout_optimization = False  # inductor's default; fp8 convolutions force it
        # Part of inductor's cache key, so each variant compiles (or finds) its own kernels.
        inductor_config.coordinate_descent_tuning = variant.coordinate_descent
        inductor_config.triton.prefer_nd_tiling = variant.nd_tiling
        levers = engine.apply_levers(
            settings
        )  # as Engine.start applies them (the engine's plan: variant_plan)
        if variant.fp8_convs_nchw:
            inductor_config.force_layout_optimization = False  # the peer: as run 52 measured it
            levers = [lever.replace(", channels-last", ", NCHW (the peer)") for lever in levers]
        if (
            variant.fp8 != any(lever.startswith("fp8") for lever in levers)
            or variant.fp8_convs != any(lever.startswith("fp8 convolutions") for lever in levers)
            or variant.fused_geglu != any(lever.startswith("fp8 GEGLU") for lever in levers)
            or variant.regions != any("transformer blocks as regions" in lever for lever in levers)
            or variant.timed_reductions != any("timed reductions" in lever for lever in levers)
            or variant.bf16_fused_geglu != any("first bf16 matmul" in lever for lever in levers)
            or variant.guided_rows_only != any("guided rows only" in lever for lever in levers)
        ):
            raise RuntimeError(f"{variant.spec}: levers applied were {levers}")
        row: dict[str, Any] = {"levers": levers, "attention": variant_plan.attention}
        rates = UnetRates(engine.models.base.unet, None if variant.mlperf else engine.models.refiner.unet)
        run.results["variants"][variant.spec] = row
        sync()
        plans_before = len(plan_reports())
        with decode_as_before(engine, settings) if variant.old_decode else contextlib.nullcontext():
            measure_engine(variant, engine, row, rates, levers, began, settings)
        if variant.fp8_convs:  # what choosing cuDNN's plans cost this variant, and which it chose (by name)
            reports = plan_reports()[plans_before:]
            row["fp8_conv_plans"] = reports
            row["fp8_conv_plans_s"] = round(sum(report["seconds"] for report in reports), 1)
            run.log(f"{variant.spec}: {len(reports)} cuDNN graphs built in {row['fp8_conv_plans_s']} s")
        last_engine[:] = [engine, variant]

    def measure_engine(
        variant: Variant,
        engine: Any,
        row: dict[str, Any],
        rates: UnetRates,
        levers: list[str],
        began: float,
        settings: Settings,
    ) -> None:
        if variant.mlperf:
            row["mlperf"] = {}
            mlperf_rows(engine, variant.spec, mlperf_batches, rates, row["mlperf"], settings)
        else:
            t0 = time.perf_counter()
            row["warm_up_s"] = warm_up(engine, [(px, px)], [1])
            run.log(f"{variant.spec}: warm-up {row['warm_up_s']:.1f}s ({time.perf_counter() - t0:.1f}s)")
            engine.generate(ensemble_request())
            row["first_image_s"] = time.perf_counter() - began
            rates.discard()
            reset_peak()
            row.update(timed(lambda: engine.generate(ensemble_request()), args.runs))
            row["peak_gib"] = peak_gib()
            row["unet"] = rates.take()
            row["stages"] = stages_of(engine.generate(ensemble_request()))
            ensemble_abs = host_abs(
                engine, functools.partial(engine.generate, ensemble_request()), 1, variant.spec
            )
            if ensemble_abs:  # the host changes' share of the 1.2 s target's gap
                row["ab"] = ensemble_abs
            if any(lever.startswith("text encoders as CUDA graphs") for lever in levers):
                row["text_encoder_graphs"] = encoder_graphs_report(engine)
                run.log(f"{variant.spec}: text encoder graphs {row['text_encoder_graphs']}")
            if args.prompt_cache_ab:
                with_prompt_cache(engine, row, variant.spec)
            if args.profile:
                row["profile"] = profile_generation(engine, ensemble_request())
                run.log(f"{variant.spec}: profile {row['profile']}")
            if "latents" in reference:
                latents, image = final_latents_of(engine, ensemble_request())
                rel_l2 = float((latents - reference["latents"]).norm() / reference["latents"].norm())
                row["fidelity_vs_eager"] = {
                    "relative_l2_final_latents": rel_l2,
                    "psnr_db": psnr(image, reference["image"]),
                }
            if args.idle_profile:  # the ensemble's time outside its UNet calls: where the GPU waits
                row["gpu_idle"] = profile_idle(
                    functools.partial(engine.generate, ensemble_request()), calls=2
                )
                print_idle(row["gpu_idle"], f"{variant.spec} ensemble")
            if args.idle_stacks:
                row["gpu_idle_with_stacks"] = profile_idle(
                    functools.partial(engine.generate, ensemble_request()), calls=2, with_stack=True
                )
                print_idle(row["gpu_idle_with_stacks"], f"{variant.spec} ensemble, with Python stacks")
            run.log(f"{variant.spec}: median {row['median_s']:.3f}s")

    if "variants" in phases:
        compiled_before: set[tuple[Any, ...]] = set()
        for variant in variants:
            # A variant whose UNets compile to what an earlier one compiled (the text encoders' graphs, say, are
            # not compiled) finds the kernels in the cache: ~40 s of warm-up and ~15 s of runs, not a cold
            # compile. Run 41 skipped such a variant, 118 s left against the cold compile's 120 s.
            key = (  # the UNets' compile (the decoder's is short)
                variant.mode,
                variant.fp8,
                variant.fp8_scales,
                variant.channels_last,
                variant.attention,
                variant.dynamic,
            )
            needs = 60 if variant.mode == "off" or key in compiled_before else args.compile_needs_s
            compiled_before.add(key)
            last_engine.clear()
            release_memory()
            run.phase(f"variant {variant.spec}", needs, lambda variant=variant: measure(variant))

    def restart() -> None:
        engine, variant = last_engine
        # On the engine's GPU thread: CUDA-graph trees are per thread, and reset clears the calling thread's.
        engine._gpu.run(torch._dynamo.reset)
        if variant.mlperf:
            sync()
            t0 = time.perf_counter()
            engine.generate_batch([BatchItem(mlperf_request())])
            sync()
            run.results["second_start_s"] = {variant.spec: time.perf_counter() - t0}
        else:
            run.results["second_start_s"] = {variant.spec: warm_up(engine, [(px, px)], [1])}

    if "restart" in phases and last_engine:
        run.phase("restart", 60, restart)
    torch.backends.cudnn.benchmark = False
    run.save()
    print_table(run.results)


def print_table(r: dict[str, Any]) -> None:
    print("\n" + json.dumps(r.get("versions", {})))
    print(f"plan: {r.get('plan')}")
    peer = r.get("peer_fp16_ensemble", {}).get("median_s")

    def row(name: str, x: dict[str, Any]) -> None:
        if "median_s" not in x:
            return
        ratio = f"  {peer / x['median_s']:.2f}x peer" if peer else ""
        fidelity = x.get("fidelity_vs_eager")
        extra = (
            f"  relL2 {fidelity['relative_l2_final_latents']:.2e} PSNR {fidelity['psnr_db']:.1f}"
            if fidelity
            else ""
        )
        warm = f"  warm {x['warm_up_s']:.0f}s" if "warm_up_s" in x else ""
        first = f"  first image {x['first_image_s']:.0f}s" if "first_image_s" in x else ""
        unet = "".join(
            f"  {role} {u['gpu_ms_median']:.1f} ms {u['tflop_s']:.0f} TFLOP/s"
            for role, u in x.get("unet", {}).items()
        )
        print(
            f"{name:40s} {x['median_s']:7.3f} s ({x['min_s']:.3f}-{x['max_s']:.3f}) "
            f"peak {x['peak_gib']:.1f} GiB{ratio}{warm}{first}{unet}{extra}"
        )

    row("seed: fp32, 50 + img2img 30 x 0.3", r.get("seed_fp32", {}))
    row("peer: diffusers fp16 ensemble 40", r.get("peer_fp16_ensemble", {}))
    row("imagesmith eager bf16 ensemble 40", r.get("engine_eager_ensemble", {}))
    for spec, x in r.get("variants", {}).items():
        row(spec, x)
    for spec, x in [("eager", r.get("engine_eager_ensemble", {})), *r.get("variants", {}).items()]:
        if "with_prompt_cache" in x:
            cached = x["with_prompt_cache"]
            fresh = x.get("with_prompt_cache_new_prompts", {}).get("median_s", float("nan"))
            print(
                f"{spec:40s} prompt cache off {x['median_s']:.3f} s, on {cached['median_s']:.3f} s "
                f"({cached['min_s']:.3f}-{cached['max_s']:.3f}), on with new prompts {fresh:.3f} s"
            )
    mlperf = {"eager": r.get("mlperf_eager", {})}
    mlperf.update({spec: x["mlperf"] for spec, x in r.get("variants", {}).items() if "mlperf" in x})
    for spec, rows in mlperf.items():
        for batch, x in rows.items():
            print(
                f"mlperf {spec:28s} batch {batch:>2}: {x['median_s']:.3f} s, {x['images_per_s']:.2f} images/s, "
                f"peak {x['peak_gib']:.1f} GiB, first call {x['first_call_s']:.1f}s, "
                f"PSNR vs eager {x.get('psnr_vs_eager_db', '-')}"
            )
    if "second_start_s" in r:
        print(f"second start: {r['second_start_s']}")
    print(f"skipped: {r['skipped']}  errors: {list(r['errors'])}")


if __name__ == "__main__":
    main()
