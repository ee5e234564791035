"""The fast path on one GPU, in one run: eager engine vs diffusers' fp16 peer vs the compiled engine.

Phases (each skipped, and said so, when the time budget runs short; results are saved after every phase):
  peer       diffusers' documented fp16 ensemble, 40 steps, split 0.8 (plain pipelines): the headline's peer
  eager      imagesmith's default (bf16 everywhere, eager), ensemble 40 steps, 0.8
  mlperf     base only, 20 steps, guidance 8, 1024x1024, through Engine.generate_batch at batch 1, 4 and 8
  compiled   fused QKV + torch.compile(fullgraph) of both UNets and the VAE decoder; compile time at start
             (first start: empty inductor cache), then the same ensemble, and fidelity against eager
             (relative L2 of the final latents, PSNR of the images; same weights, same seed)
  mlperf_c   the MLPerf setting compiled, batch 1 and 8 (each batch size compiles once more)
  restart    dynamo reset, then warm-up again: the second start, served from the persistent inductor cache

Usage:  PYTHONPATH=src python benchmarks/fast_path.py --out DIR [--budget-s 540] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_random import architecture, build_components, build_pipelines

PROMPT = "a lighthouse on a rocky cliff at sunset, dramatic sky, photograph"
UNET_TFLOP = {"base": 13.522, "refine": 14.572}  # per call, batch 2 with CFG, 128x128 latents (reference)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.started = args, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"skipped": {}, "errors": {}}

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


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "fast-path-out"))
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, to prove the code path")
    parser.add_argument("--compile-mode", default="default")
    args = parser.parse_args()
    run = Run(args)
    smoke = args.smoke
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    px, steps, mlperf_steps = (64, 4, 3) if smoke else (1024, 40, 20)
    batches = [1, 2] if smoke else [1, 4, 8]

    from imagesmith.config import Settings
    from imagesmith.engine.engine import BatchItem, Engine
    from imagesmith.engine.fast import apply_speed_levers, warm_up
    from imagesmith.engine.hardware import plan_hardware, probe_device
    from imagesmith.engine.models import LoadedModels, ModelSources
    from imagesmith.schemas import GenerationRequest

    settings = Settings(data_dir=run.out / "data", compile=args.compile_mode)
    plan = plan_hardware(probe_device(device), Settings())
    run.results["plan"] = plan.summary()
    run.results["versions"] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
    }
    arch = architecture("smoke" if smoke else "full")

    def ensemble_request(seed: int = 1) -> GenerationRequest:
        return GenerationRequest(prompt=PROMPT, width=px, height=px, num_inference_steps=steps, seed=seed)

    # --- the peer: diffusers' fp16 ensemble, as its docs write it -----------------------------------------
    def peer() -> None:
        components = build_components(arch, device)
        components.to(torch.float16)
        base, refiner = build_pipelines(components)
        for pipe in (base, refiner):
            pipe.set_progress_bar_config(disable=True)

        def once() -> None:
            latents = base(
                prompt=PROMPT,
                width=px,
                height=px,
                num_inference_steps=steps,
                denoising_end=0.8,
                output_type="latent",
                generator=torch.Generator("cpu").manual_seed(1),
            ).images
            refiner(
                prompt=PROMPT,
                image=latents,
                num_inference_steps=steps,
                denoising_start=0.8,
                generator=torch.Generator("cpu").manual_seed(1),
            ).images[0]

        once()
        reset_peak()
        run.results["peer_fp16_ensemble"] = {**timed(once, args.runs), "peak_gib": peak_gib()}
        # The peer's pipelines go out of scope with this function; the allocator then gives their memory back.

    def release_peer() -> None:
        if device == "cuda":
            torch.cuda.empty_cache()

    run.phase("peer", 60, peer)
    release_peer()

    components = build_components(arch, device)
    components.to(plan.dtype, plan.vae_dtype)
    base, refiner = build_pipelines(components)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    engine = Engine(LoadedModels(base, refiner, None, ModelSources("random-full", "random-full", None)), plan)
    reference: dict[str, Any] = {}

    def final_latents_of(request: GenerationRequest) -> tuple[torch.Tensor, np.ndarray]:
        captured: list[torch.Tensor] = []
        result = engine.generate(request, on_progress=lambda e: captured.append(e.latents))
        return captured[-1].float().cpu(), np.asarray(result.images[0]).astype(np.float64)

    def eager() -> None:
        engine.generate(ensemble_request())
        reset_peak()
        stats = timed(lambda: engine.generate(ensemble_request()), args.runs)
        result = engine.generate(ensemble_request())
        reference["latents"], reference["image"] = final_latents_of(ensemble_request())
        run.results["engine_eager_ensemble"] = {
            **stats,
            "peak_gib": peak_gib(),
            "stages": [(s.name, s.steps, round(s.seconds, 4)) for s in result.metadata.stages],
        }

    run.phase("eager", 40, eager)

    def mlperf(label: str, batch_sizes: list[int]) -> None:
        rows = {}
        for batch in batch_sizes:
            request = GenerationRequest(
                prompt=PROMPT,
                width=px,
                height=px,
                num_inference_steps=mlperf_steps,
                guidance_scale=8.0,
                refine_mode="none",
                seed=7,
            )
            items = [BatchItem(request) for _ in range(batch)]
            engine.generate_batch(items)  # warm (compiles this batch size when compiled)
            reset_peak()
            stats = timed(lambda items=items: engine.generate_batch(items), 3)
            rows[str(batch)] = {**stats, "images_per_s": batch / stats["median_s"], "peak_gib": peak_gib()}
            run.log(f"{label} batch {batch}: {rows[str(batch)]['images_per_s']:.2f} images/s")
            run.save()
        run.results[label] = rows

    run.phase("mlperf", 60, lambda: mlperf("mlperf_eager", batches))

    def compiled() -> None:
        t0 = time.perf_counter()
        levers = apply_speed_levers(base, refiner, plan, settings)
        warm = warm_up(engine, [(px, px)], [1])
        run.results["compile_first_start_s"] = time.perf_counter() - t0
        run.results["levers"] = levers
        reset_peak()
        stats = timed(lambda: engine.generate(ensemble_request()), args.runs)
        result = engine.generate(ensemble_request())
        latents, image = final_latents_of(ensemble_request())
        rel_l2 = float((latents - reference["latents"]).norm() / reference["latents"].norm())
        mse = float(np.mean((image - reference["image"]) ** 2))
        run.results["engine_compiled_ensemble"] = {
            **stats,
            "peak_gib": peak_gib(),
            "warm_up_s": warm,
            "stages": [(s.name, s.steps, round(s.seconds, 4)) for s in result.metadata.stages],
            "fidelity_vs_eager": {
                "relative_l2_final_latents": rel_l2,
                "psnr_db": 10 * np.log10(255**2 / mse) if mse else float("inf"),
            },
        }

    run.phase("compiled", 250, compiled)
    if "engine_compiled_ensemble" in run.results:
        run.phase("mlperf_c", 150, lambda: mlperf("mlperf_compiled", [batches[0], batches[-1]]))

        def restart() -> None:
            torch._dynamo.reset()
            run.results["compile_second_start_s"] = warm_up(engine, [(px, px)], [1])

        run.phase("restart", 60, restart)
    run.save()
    print_table(run.results)


def print_table(r: dict[str, Any]) -> None:
    print("\n" + json.dumps(r.get("versions", {})))
    print(f"plan: {r.get('plan')}")

    def row(name: str, key: str) -> None:
        if key in r:
            x = r[key]
            print(
                f"{name:34s} {x['median_s']:7.3f} s  ({x['min_s']:.3f}-{x['max_s']:.3f})  peak {x['peak_gib']:.1f} GiB"
            )

    row("peer: diffusers fp16 ensemble 40", "peer_fp16_ensemble")
    row("imagesmith eager bf16 ensemble 40", "engine_eager_ensemble")
    row("imagesmith compiled ensemble 40", "engine_compiled_ensemble")
    for key in ("mlperf_eager", "mlperf_compiled"):
        for batch, x in r.get(key, {}).items():
            print(
                f"{key} batch {batch:>2}: {x['median_s']:.3f} s, {x['images_per_s']:.2f} images/s, "
                f"peak {x['peak_gib']:.1f} GiB"
            )
    if "engine_compiled_ensemble" in r:
        print(f"fidelity: {r['engine_compiled_ensemble']['fidelity_vs_eager']}")
    for key in ("compile_first_start_s", "compile_second_start_s"):
        if key in r:
            print(f"{key}: {r[key]:.1f}")
    print(f"skipped: {r['skipped']}  errors: {list(r['errors'])}")


if __name__ == "__main__":
    main()
