"""GPU benchmark: full-size SDXL base + refiner (random weights) through plain diffusers and the imagesmith engine.

    PYTHONPATH=src python benchmarks/sdxl_fullsize.py --out /tmp/bench            # on a CUDA GPU
    PYTHONPATH=src python benchmarks/sdxl_fullsize.py --smoke --out /tmp/bench    # CPU, toy sizes, 64x64

Configurations, in this order (one process, one GPU, batch 1, each warmed up once, then timed):
  seed_fp32           the seed document: fp32, base 50 steps to latents, refiner img2img 30 steps at strength
                      0.3 (9 refiner steps), guidance 8.0, negative prompt "", refiner with its own copies of
                      text_encoder_2 and vae (two from_pretrained calls); plain diffusers
  diffusers_fp16_ensemble
                      diffusers' documented ensemble of experts: fp16, 40 steps, denoising_end/start 0.8,
                      refiner sharing text_encoder_2 + vae, VAE upcast to fp32 for decode (force_upcast)
  engine_<mode>       imagesmith's Engine at its default plan (bf16 on Ampere+): ensemble, img2img, none
  engine_ensemble_offload_model / _sequential
                      the engine with IMAGESMITH offload=model / sequential (sequential at fewer steps)

Per run: end-to-end wall time (synchronized), every UNet call timed with CUDA events (forward pre/post hooks)
plus the host time to enqueue it, VAE decode timed the same way, peak GPU memory per configuration
(torch.cuda.max_memory_allocated, reset at the start of each configuration). Full results go to
OUT/results.json (rewritten after every configuration, so a run cut short keeps what it finished); a short
table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_random import architecture, build_components, build_pipelines, parameter_counts, run_two_stage

GIB = 1024**3
PROMPT = "a lighthouse on a rocky cliff at sunset, dramatic sky, photograph"
# Reference FLOPs per UNet call with classifier-free guidance (batch 2, 128x128 latents), shared/reference.
UNET_TFLOP = {"base": 13.522, "refiner": 14.572}
VAE_DECODE_TFLOP = 10.47


# ---------------------------------------------------------------------------------------------- timing probes
class Probe:
    """Times every UNet call and every VAE decode of the current run: device events + host enqueue time."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.records: list[dict[str, Any]] = []
        self.check_finite = False
        self.nonfinite: dict[str, int] = {}

    def reset(self, check_finite: bool = False) -> None:
        self.records, self.check_finite, self.nonfinite = [], check_finite, {}

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return None

    def begin(self, role: str) -> dict[str, Any]:
        record = {
            "role": role,
            "host0": time.perf_counter(),
            "ev0": self._mark(),
            "mem0": torch.cuda.memory_allocated() if self.cuda else 0,
        }
        self.records.append(record)
        return record

    def end(self, record: dict[str, Any], output: Any = None) -> None:
        record["ev1"] = self._mark()
        record["host1"] = time.perf_counter()
        if self.check_finite and isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
            self.nonfinite[record["role"]] = self.nonfinite.get(record["role"], 0) + 1

    def attach_unet(self, unet: Any, role: str) -> None:  # Any: it gets attributes nn.Module's typing refuses
        if getattr(unet, "_bench_probe", None) is not None:
            return
        open_records: list[dict[str, Any]] = []

        def pre(module: Any, args: Any, kwargs: Any) -> None:
            open_records.append(self.begin(role))

        def post(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            self.end(open_records.pop(), sample)

        unet.register_forward_pre_hook(pre, with_kwargs=True)
        unet.register_forward_hook(post, with_kwargs=True)
        unet._bench_probe = self

    def attach_vae(self, vae: Any) -> None:
        if getattr(vae, "_bench_probe", None) is not None:
            return
        decode = vae.decode

        def timed_decode(*args: Any, **kwargs: Any) -> Any:
            record = self.begin("vae_decode")
            out = decode(*args, **kwargs)
            sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", None)
            self.end(record, sample)
            return out

        vae.decode = timed_decode
        vae._bench_probe = self

    def summary(self) -> dict[str, Any]:
        """Per role: calls, device ms per call (median/min/max), host enqueue ms per call (median)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, Any] = {}
        for role in sorted({r["role"] for r in self.records}):
            rows = [r for r in self.records if r["role"] == role and "host1" in r]
            host = [1e3 * (r["host1"] - r["host0"]) for r in rows]
            dev = [r["ev0"].elapsed_time(r["ev1"]) for r in rows] if self.cuda else host
            out[role] = {
                "calls": len(rows),
                "device_ms_median": statistics.median(dev),
                "device_ms_min": min(dev),
                "device_ms_max": max(dev),
                "device_ms_total": sum(dev),
                "host_enqueue_ms_median": statistics.median(host),
                # the first call of a stage may include weight transfers (offload) or one-time setup
                "device_ms_first": dev[0],
                "mem_allocated_gib_at_first_call": rows[0]["mem0"] / GIB,
            }
        return out


# ------------------------------------------------------------------------------------------------- helpers
def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def image_stats(image: Any) -> dict[str, Any]:
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return {
        "size": list(image.size),
        "mean": float(array.mean()),
        "std": float(array.std()),
        "black_fraction": float((array.max(axis=2) < 1).mean()),
        "all_black": bool(array.max() < 1),
        "all_one_value": bool(array.std() == 0),
    }


def dtypes(named: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, module in named.items():
        if not isinstance(module, torch.nn.Module):
            continue
        params = list(module.parameters())
        # sequentially offloaded modules keep weights on 'meta' with a CPU copy: report the copy's dtype
        out[name] = str(params[0].dtype).removeprefix("torch.") if params else "n/a"
    return out


def versions() -> dict[str, Any]:
    import accelerate
    import diffusers
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / GIB,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
        try:
            info["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,"
                    "temperature.gpu",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception as error:  # informational only
            info["nvidia_smi"] = f"unavailable: {error}"
    return info


def matmul_ceiling() -> dict[str, float]:
    """bf16 8192^3 matrix product on random data: the card's practical tensor-core rate, for context."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    stop.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / 10
    del a, b
    torch.cuda.empty_cache()
    return {"ms": ms, "tflops": 2 * 8192**3 / ms / 1e9}


# ---------------------------------------------------------------------------------------------- the runner
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = args.device.startswith("cuda")
        self.probe = Probe(self.cuda)
        self.started = time.perf_counter()
        self.results: dict[str, Any] = {"configs": {}, "skipped": {}, "errors": {}}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        self.results["elapsed_s"] = self.elapsed()
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {message}", flush=True)

    def measure(
        self,
        name: str,
        fn: Callable[[], dict[str, Any]],
        runs: int,
        describe: dict[str, Any],
        warmup_fn: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Warm up once (with NaN checks on), then `runs` timed runs. fn returns per-run extras (stages, image)."""
        self.measure_interleaved([(name, fn, describe, warmup_fn)], runs)

    def measure_interleaved(
        self,
        items: list[
            tuple[str, Callable[[], dict[str, Any]], dict[str, Any], Callable[[], dict[str, Any]] | None]
        ],
        runs: int,
    ) -> None:
        """Several configurations measured together: each warmed up once, then `runs` rounds in ABBA order (the
        order flips every round), so slow drift of the host or the card hits every configuration alike.
        With several items the peak memory is shared (all their models are resident at once)."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / GIB if self.cuda else 0.0
        warm: dict[str, Any] = {}
        for name, fn, describe, warmup_fn in items:
            self.log(f"{name}: warm-up ({describe.get('what', '')})")
            self.probe.reset(check_finite=True)
            began = time.perf_counter()
            warm_extra = (warmup_fn or fn)()
            sync(self.cuda)
            warm[name] = {
                "seconds": time.perf_counter() - began,
                "nonfinite_calls": dict(self.probe.nonfinite),
                **warm_extra,
            }
        timed: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in items}
        for index in range(runs):
            order = items if index % 2 == 0 else items[::-1]
            for name, fn, _, _ in order:
                self.probe.reset(check_finite=False)
                began = time.perf_counter()
                extra = fn()
                sync(self.cuda)
                seconds = time.perf_counter() - began
                calls = self.probe.summary()
                timed[name].append({"seconds": seconds, "calls": calls, **extra})
                self.log(
                    f"{name}: run {index + 1}/{runs} {seconds:.3f}s "
                    + " ".join(
                        f"{role}={c['calls']}x{c['device_ms_median']:.1f}ms" for role, c in calls.items()
                    )
                )
        for name, _, describe, _ in items:
            secs = [t["seconds"] for t in timed[name]]
            entry = {
                **describe,
                "runs": runs,
                "seconds": secs,
                "median_s": statistics.median(secs),
                "min_s": min(secs),
                "max_s": max(secs),
                "warmup": warm[name],
                "timed": timed[name],
                "resident_gib_at_start": resident,
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if self.cuda else None,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if self.cuda else None,
                "peak_shared_with": [n for n, *_ in items if n != name],
            }
            entry["unet"] = self._unet_rates(timed[name])
            self.results["configs"][name] = entry
            peak = entry["peak_allocated_gib"]
            self.log(
                f"{name}: median {entry['median_s']:.3f}s (min {entry['min_s']:.3f}, max {entry['max_s']:.3f}),"
                f" peak {peak if peak is None else round(peak, 2)} GiB"
            )
        self.save()

    def _unet_rates(self, timed: list[dict[str, Any]]) -> dict[str, Any]:
        """Achieved TFLOP/s per UNet call from the median device time over all timed runs' calls."""
        out: dict[str, Any] = {}
        for role in ("base", "refiner", "vae_decode"):
            meds = [t["calls"][role]["device_ms_median"] for t in timed if role in t["calls"]]
            hosts = [t["calls"][role]["host_enqueue_ms_median"] for t in timed if role in t["calls"]]
            if not meds:
                continue
            ms = statistics.median(meds)
            row = {
                "device_ms_per_call": ms,
                "host_enqueue_ms_per_call": statistics.median(hosts),
                "calls_per_run": timed[0]["calls"][role]["calls"],
            }
            if self.args.size == "full":
                tflop = VAE_DECODE_TFLOP if role == "vae_decode" else UNET_TFLOP[role]
                row["tflops_achieved"] = tflop / (ms / 1e3)
            out[role] = row
        return out

    def guard(self, name: str, needs_s: float) -> bool:
        left = self.args.budget_s - self.elapsed()
        if left < needs_s:
            self.results["skipped"][name] = f"time budget: {left:.0f}s left, needs about {needs_s:.0f}s"
            self.log(f"SKIP {name}: {self.results['skipped'][name]}")
            self.save()
            return False
        return True

    def attempt(self, name: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception as error:  # one broken configuration must not lose the others
            self.results["errors"][name] = f"{type(error).__name__}: {error}"
            self.log(f"ERROR {name}: {type(error).__name__}: {error}")
            traceback.print_exc()
            self.save()
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- the configs
def run_plain_two_stage(
    bench: Bench,
    base: Any,
    refiner: Any,
    *,
    steps: int,
    refine: dict[str, Any],
    base_kwargs: dict[str, Any],
    common: dict[str, Any],
) -> dict[str, Any]:
    """One plain-diffusers generation (sdxl_random.run_two_stage), each stage timed."""
    base_done: list[float] = []

    def base_finished() -> None:
        sync(bench.cuda)
        base_done.append(time.perf_counter())

    t0 = time.perf_counter()
    image = run_two_stage(
        base,
        refiner,
        PROMPT,
        {"num_inference_steps": steps, **base_kwargs, **common},
        {**refine, **common},
        base_finished,
    )
    sync(bench.cuda)
    t1, t2 = base_done[0], time.perf_counter()
    return {"stages": {"base": t1 - t0, "refine_and_decode": t2 - t1}, "image": image_stats(image)}


def engine_request(mode: str, size: int, steps: int, refine_steps: int) -> Any:
    from imagesmith.schemas import GenerationRequest

    return GenerationRequest(
        prompt=PROMPT,
        width=size,
        height=size,
        num_inference_steps=steps,
        refine_mode=mode,
        refine_steps=refine_steps,
        refine_strength=0.3,
        seed=1,
    )


def run_engine(engine: Any, request: Any) -> dict[str, Any]:
    result = engine.generate(request)
    meta = result.metadata
    image = result.images[0]
    return {
        "stages": {s.name: {"steps": s.steps, "seconds": s.seconds} for s in meta.stages},
        "engine_total_s": meta.total_seconds,
        "refined": meta.refined,
        "refine_mode_ran": str(meta.refine_mode_ran.value),
        "not_refined_reason": meta.not_refined_reason,
        "decoded_in_fp32_retry": [i.decoded_in_fp32_retry for i in meta.images],
        "image": image_stats(image),
        "plan_dtype": meta.dtype,
    }


def place_like_engine(base: Any, refiner: Any, plan: Any) -> None:
    """What imagesmith.engine.models.load_models does after loading: placement by the plan."""
    from imagesmith.engine.models import _place

    _place(base, plan)
    _place(refiner, plan)


def apply_levers_like_engine(base: Any, refiner: Any, plan: Any, settings: Any) -> list[str]:
    """What Engine.start does after load_models: imagesmith.engine.fast.apply_speed_levers."""
    from imagesmith.engine.fast import apply_speed_levers

    return list(apply_speed_levers(base, refiner, plan, settings))


def install_decode_device_shim(vae: Any) -> None:
    """Work around the engine's decode under model offload (decode.py sends the latents to the VAE's parameter
    device, which is the CPU between uses; diffusers' decode hook moves the weights, not the inputs): move tensor
    arguments to the offload hook's execution device. Benchmark-only; the fix belongs in decode.py."""
    inner = vae.decode

    def decode_on_execution_device(*args: Any, **kwargs: Any) -> Any:
        device = getattr(getattr(vae, "_hf_hook", None), "execution_device", None)
        if device is not None:
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        return inner(*args, **kwargs)

    vae.decode = decode_on_execution_device
    vae._bench_shim_inner = inner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="toy architecture, 64x64, 2-4 steps, CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--runs", type=int, default=5, help="timed runs per configuration")
    parser.add_argument("--seed-runs", type=int, default=3, help="timed runs of the fp32 seed configuration")
    parser.add_argument(
        "--sequential-steps", type=int, default=10, help="steps for the sequential-offload run"
    )
    parser.add_argument("--budget-s", type=float, default=480, help="skip optional configs past this time")
    parser.add_argument(
        "--weight-scale", type=float, default=1.0, help="multiply random weights (dim>1) by this"
    )
    parser.add_argument(
        "--interleaved-runs",
        type=int,
        default=6,
        help="rounds of the opt-in 'interleaved' config (fp16 peer vs engine, ABBA)",
    )
    parser.add_argument(
        "--offload-decode-shim",
        action="store_true",
        help="runs 2-3 only: worked around the decode-device bug under offload=model, fixed in the engine since",
    )
    parser.add_argument(
        "--levers",
        choices=("settings", "off"),
        default="settings",
        help="engine speed levers (engine/fast.py): as Settings() says (the engine's default), or none",
    )
    parser.add_argument("--only", default="", help="comma-separated config names to run (default: all)")
    args = parser.parse_args()
    args.size = "smoke" if args.smoke else "full"
    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    px = 64 if args.smoke else 1024
    steps40, steps50, refine30 = (4, 5, 4) if args.smoke else (40, 50, 30)
    only = {s for s in args.only.split(",") if s}

    def wanted(name: str) -> bool:
        return not only or name in only

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
    bench = Bench(args)
    cuda = bench.cuda
    bench.results["args"] = vars(args)
    bench.results["versions"] = versions()
    bench.log(f"versions: {json.dumps(bench.results['versions'])}")
    if cuda:
        bench.results["matmul_bf16_8192"] = matmul_ceiling()
        bench.log(f"bf16 matmul ceiling: {bench.results['matmul_bf16_8192']}")

    from imagesmith.config import Settings
    from imagesmith.engine.engine import Engine
    from imagesmith.engine.hardware import plan_hardware, probe_device
    from imagesmith.engine.models import LoadedModels, ModelSources

    # The plan is chosen before any model is resident, as Engine.start does.
    default_plan = plan_hardware(probe_device(args.device), Settings())
    bench.results["default_plan"] = default_plan.summary()
    bench.log(f"default plan: {default_plan.summary()}")

    began = time.perf_counter()
    components: Any = build_components(architecture(args.size), args.device, weight_scale=args.weight_scale)
    sync(cuda)
    bench.results["build_s"] = time.perf_counter() - began
    bench.results["parameters"] = parameter_counts(components)
    bench.log(
        f"built {args.size} components on {args.device} in {bench.results['build_s']:.1f}s: "
        f"{bench.results['parameters']}"
    )
    bench.save()

    probe = bench.probe
    probe.attach_unet(components.base_unet, "base")
    probe.attach_unet(components.refiner_unet, "refiner")

    # 1. the seed: fp32, base 50 -> refiner img2img 30 x 0.3, refiner with its own text_encoder_2 + vae copies
    if wanted("seed_fp32"):

        def seed_config() -> None:
            base, refiner = build_pipelines(components, separate_refiner_copies=True)
            probe.attach_vae(base.vae)
            probe.attach_vae(refiner.vae)
            common = {"negative_prompt": "", "guidance_scale": 8.0}

            def one() -> dict[str, Any]:
                return run_plain_two_stage(
                    bench,
                    base,
                    refiner,
                    steps=steps50,
                    base_kwargs={},
                    common=common,
                    refine={"num_inference_steps": refine30, "strength": 0.3},
                )

            bench.measure(
                "seed_fp32",
                one,
                args.seed_runs,
                {
                    "what": f"plain diffusers fp32, base {steps50} steps -> refiner img2img {refine30} x 0.3, cfg 8.0",
                    "dtypes": {"base": dtypes(base.components), "refiner": dtypes(refiner.components)},
                },
            )

        bench.attempt("seed_fp32", seed_config)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # 2. diffusers' documented ensemble in fp16
    if wanted("diffusers_fp16_ensemble"):

        def peer_config() -> None:
            components.to(torch.float16)
            base, refiner = build_pipelines(components)
            probe.attach_vae(components.vae)

            def one() -> dict[str, Any]:
                return run_plain_two_stage(
                    bench,
                    base,
                    refiner,
                    steps=steps40,
                    common={},
                    base_kwargs={"denoising_end": 0.8},
                    refine={"num_inference_steps": steps40, "denoising_start": 0.8},
                )

            bench.measure(
                "diffusers_fp16_ensemble",
                one,
                args.runs,
                {
                    "what": f"plain diffusers fp16 ensemble, {steps40} steps split at 0.8, VAE upcast to fp32 on decode",
                    "dtypes": {"base": dtypes(base.components), "refiner": dtypes(refiner.components)},
                },
            )

        bench.attempt("diffusers_fp16_ensemble", peer_config)

    # 3. the engine at its default plan, built as Engine.start builds it: load dtype, placement, speed levers
    engine_modes = [m for m in ("ensemble", "img2img", "none") if wanted(f"engine_{m}")]
    # On a CPU (--smoke) model offload's hooks still run (device 'cpu'): it proves the code path, not the memory.
    # Sequential offload with execution device == offload device (cpu) breaks inside accelerate
    # (set_module_tensor_to_device: "new() received an invalid combination of arguments"), so it runs on CUDA only.
    offload_modes = [
        m
        for m in ("model", "sequential")
        if wanted(f"engine_ensemble_offload_{m}") and (cuda or m == "model")
    ]
    interleaved = wanted("interleaved") and bool(only)  # opt-in: --only interleaved,...
    levers_ab = wanted("levers_ab") and bool(only)  # opt-in: engine without vs with its speed levers
    use_levers = args.levers == "settings"
    sources = ModelSources(
        base="random-full-size-sdxl-base", refiner="random-full-size-sdxl-refiner", vae=None
    )

    def make_engine(plan: Any, settings: Any, levers: bool, comps: Any = None) -> tuple[Any, Any]:
        """Cast to the plan's dtypes (load_models loads in them), place as the plan says, then the speed levers
        (Engine.start applies them after loading). Fresh random components unless `comps` is given."""
        if comps is None:
            comps = build_components(architecture(args.size), args.device, weight_scale=args.weight_scale)
        comps.to(plan.dtype, plan.vae_dtype)
        probe.attach_unet(comps.base_unet, "base")
        probe.attach_unet(comps.refiner_unet, "refiner")
        probe.attach_vae(comps.vae)
        base, refiner = build_pipelines(comps)
        place_like_engine(base, refiner, plan)
        applied = apply_levers_like_engine(base, refiner, plan, settings) if levers else []
        engine = Engine(LoadedModels(base=base, refiner=refiner, refiner_error=None, sources=sources), plan)
        engine.levers = applied
        return engine, comps

    def describe_engine(engine: Any, what: str) -> dict[str, Any]:
        base, refiner = engine.models.base, engine.models.refiner
        return {
            "what": what,
            "plan": engine.plan.summary(),
            "levers": list(getattr(engine, "levers", [])),
            "dtypes": {"base": dtypes(base.components), "refiner": dtypes(refiner.components)},
        }

    state: dict[str, Any] = {}
    if engine_modes or interleaved or levers_ab:
        # (the components stay referenced by the engine's pipelines only, so state.clear() below frees them)
        state["engine"] = make_engine(default_plan, Settings(), use_levers, comps=components)[0]
        bench.log(f"default engine levers: {state['engine'].levers or 'none'} (--levers {args.levers})")
    for mode in engine_modes:
        name = f"engine_{mode}"

        def engine_config(mode: str = mode, name: str = name) -> None:
            request = engine_request(mode, px, steps40, refine30)
            engine = state["engine"]
            what = (
                f"imagesmith engine, mode {mode}, {steps40} steps"
                + (f", refiner {refine30} x 0.3" if mode == "img2img" else "")
                + (", split 0.8" if mode == "ensemble" else "")
            )
            bench.measure(name, lambda: run_engine(engine, request), args.runs, describe_engine(engine, what))

        bench.attempt(name, engine_config)

    # 3b. the fp16 peer and the engine's bf16 ensemble, interleaved ABBA: a fair A/B under launch-bound noise.
    # A second set of the same random weights (same seed) in fp16 for the plain diffusers pipelines.
    if interleaved:

        def interleaved_config() -> None:
            peer_components = build_components(
                architecture(args.size), args.device, weight_scale=args.weight_scale
            )
            peer_components.to(torch.float16)
            probe.attach_unet(peer_components.base_unet, "base")
            probe.attach_unet(peer_components.refiner_unet, "refiner")
            probe.attach_vae(peer_components.vae)
            peer_base, peer_refiner = build_pipelines(peer_components)
            request = engine_request("ensemble", px, steps40, refine30)
            engine = state["engine"]

            def peer() -> dict[str, Any]:
                return run_plain_two_stage(
                    bench,
                    peer_base,
                    peer_refiner,
                    steps=steps40,
                    common={},
                    base_kwargs={"denoising_end": 0.8},
                    refine={"num_inference_steps": steps40, "denoising_start": 0.8},
                )

            peer_what = f"plain diffusers fp16 ensemble, {steps40} steps split at 0.8 (interleaved ABBA)"
            peer_dtypes = {"base": dtypes(peer_base.components), "refiner": dtypes(peer_refiner.components)}
            engine_what = f"imagesmith engine, ensemble, {steps40} steps split 0.8 (interleaved ABBA)"
            bench.measure_interleaved(
                [
                    (
                        "interleaved_diffusers_fp16_ensemble",
                        peer,
                        {"what": peer_what, "dtypes": peer_dtypes},
                        None,
                    ),
                    (
                        "interleaved_engine_ensemble",
                        lambda: run_engine(engine, request),
                        describe_engine(engine, engine_what),
                        None,
                    ),
                ],
                args.interleaved_runs,
            )

        bench.attempt("interleaved", interleaved_config)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # 3c. the engine without its speed levers vs with them (Settings() defaults), interleaved ABBA.
    if levers_ab:

        def levers_config() -> None:
            plain = make_engine(default_plan, Settings(), False)[0]
            fast = (
                state["engine"] if state["engine"].levers else make_engine(default_plan, Settings(), True)[0]
            )
            request = engine_request("ensemble", px, steps40, refine30)
            what = f"imagesmith engine, ensemble, {steps40} steps split 0.8 (interleaved ABBA)"
            bench.measure_interleaved(
                [
                    (
                        "levers_off_engine_ensemble",
                        lambda: run_engine(plain, request),
                        describe_engine(plain, what + ", no speed levers"),
                        None,
                    ),
                    (
                        "levers_default_engine_ensemble",
                        lambda: run_engine(fast, request),
                        describe_engine(fast, what + ", speed levers from Settings()"),
                        None,
                    ),
                ],
                args.interleaved_runs,
            )

        bench.attempt("levers_ab", levers_config)

    # 4. the engine with offloading (ensemble), each on fresh components: placement first, then the levers, as
    # Engine.start does (levers applied to already-offloaded modules is a path of its own)
    state.clear()
    components = None  # released for the offload plans below, which build their own
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        bench.log(
            f"GPU memory still allocated before the offload configs: {torch.cuda.memory_allocated() / GIB:.2f} GiB"
        )
    for offload in offload_modes:
        name = f"engine_ensemble_offload_{offload}"
        steps = steps40 if offload == "model" else (args.sequential_steps if not args.smoke else steps40)
        runs = args.runs if offload == "model" else 1
        needs = 60 if offload == "model" else 120
        if not bench.guard(name, needs):
            continue

        def offload_config(
            offload: str = offload, name: str = name, steps: int = steps, runs: int = runs
        ) -> None:
            settings = Settings(offload=offload)
            plan = plan_hardware(probe_device(args.device), settings)
            engine, comps = make_engine(plan, settings, use_levers)
            shimmed = offload == "model" and args.offload_decode_shim
            if shimmed:
                install_decode_device_shim(comps.vae)
            request = engine_request("ensemble", px, steps, refine30)
            warm = engine_request("ensemble", px, 2 if offload == "sequential" else steps, refine30)
            what = (
                f"imagesmith engine, ensemble, {steps} steps split 0.8, offload={offload}"
                + (" (warm-up at 2 steps)" if offload == "sequential" else "")
                + (" WITH the benchmark's decode-device shim (engine bug, see docs)" if shimmed else "")
            )
            bench.measure(
                name,
                lambda: run_engine(engine, request),
                runs,
                {**describe_engine(engine, what), "decode_device_shim": shimmed},
                warmup_fn=lambda: run_engine(engine, warm),
            )

        bench.attempt(name, offload_config)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    bench.save()
    print_table(bench)


def print_table(bench: Bench) -> None:
    res = bench.results
    v = res["versions"]
    print()
    print(
        f"GPU {v.get('gpu', 'none')} | torch {v['torch']} (CUDA {v['cuda_runtime']}) | diffusers {v['diffusers']}"
        f" | transformers {v['transformers']} | size={res['args']['size']}"
    )
    if "matmul_bf16_8192" in res:
        print(f"bf16 8192^3 matmul: {res['matmul_bf16_8192']['tflops']:.0f} TFLOP/s")
    print(
        f"{'config':34} {'median s':>9} {'min':>7} {'max':>7} {'n':>2} {'peak GiB':>8} "
        f"{'base ms/call':>12} {'ref ms/call':>11} {'base TF/s':>9} {'ref TF/s':>8} {'decode ms':>9} stages (median run)"
    )
    for name, c in res["configs"].items():
        u = c.get("unet", {})
        b, r, d = u.get("base", {}), u.get("refiner", {}), u.get("vae_decode", {})

        def f(x: Any, fmt: str) -> str:
            return format(x, fmt) if isinstance(x, (int, float)) else "-"

        median_run = sorted(c["timed"], key=lambda t: t["seconds"])[len(c["timed"]) // 2]
        stages = median_run.get("stages", {})
        stage_text = " ".join(
            f"{k}={(v['seconds'] if isinstance(v, dict) else v):.2f}" for k, v in stages.items()
        )
        flags = []
        if any(any(t.get("decoded_in_fp32_retry", [])) for t in c["timed"]):
            flags.append("FP32-RETRY")
        if c["warmup"].get("nonfinite_calls"):
            flags.append(f"NONFINITE{c['warmup']['nonfinite_calls']}")
        if c.get("levers"):
            flags.append("levers=" + "+".join(c["levers"]))
        if c.get("decode_device_shim"):
            flags.append("DECODE-SHIM")
        if any(t["image"]["all_black"] or t["image"]["all_one_value"] for t in c["timed"]):
            flags.append("BLANK-IMAGE")
        print(
            f"{name:34} {c['median_s']:9.3f} {c['min_s']:7.3f} {c['max_s']:7.3f} {c['runs']:2d} "
            f"{f(c['peak_allocated_gib'], '8.2f'):>8} {f(b.get('device_ms_per_call'), '12.1f'):>12} "
            f"{f(r.get('device_ms_per_call'), '11.1f'):>11} {f(b.get('tflops_achieved'), '9.0f'):>9} "
            f"{f(r.get('tflops_achieved'), '8.0f'):>8} {f(d.get('device_ms_per_call'), '9.1f'):>9} "
            f"{stage_text} {' '.join(flags)}"
        )
    for name, why in res["skipped"].items():
        print(f"{name:34} skipped: {why}")
    for name, why in res["errors"].items():
        print(f"{name:34} ERROR: {why[:300]}")
    print(f"total {res['elapsed_s']:.0f}s; full results in {bench.out / 'results.json'}")


if __name__ == "__main__":
    main()
