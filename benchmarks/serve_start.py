"""Time from process start to the first image, through the real service, on a first and a second start.

What a user of `imagesmith serve` with IMAGESMITH_COMPILE waits for: Python and torch import, models loaded
from a local diffusers folder (safetensors), warm-up (compilation: the first start fills the inductor cache in
DATA_DIR/compile-cache, the second reads it), health turning "ready", then one generation over HTTP
(POST /api/media/generate-image, 40-step ensemble at 1024x1024), then --requests - 1 more, one at a time (their
median is a warm one-image request's latency). The same data dir serves both starts.

--other-size WxH: then two requests at a size the warm-up did not run, and one more at the warmed-up size. By
default they run uncompiled (no compile on a request); --compile-on-request makes the first compile, and
--any-size warms up the graphs every other size shares at start-up (IMAGESMITH_WARMUP_ANY_SIZE), which
lengthens the start.

The model folder is full-size SDXL base + refiner with random weights (benchmarks/sdxl_random.py), saved once
with save_pretrained and loaded by the engine's own loader (IMAGESMITH_BASE_MODEL / IMAGESMITH_REFINER_MODEL).

Usage:  PYTHONPATH=src python benchmarks/serve_start.py --out DIR [--models DIR] [--compile default] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_random import architecture, build_components, build_pipelines


def save_random_models(folder: Path, smoke: bool) -> float:
    """Base and refiner as diffusers folders; returns seconds spent (0 when they already exist)."""
    if (folder / "refiner" / "model_index.json").exists():
        return 0.0
    began = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    components = build_components(architecture("smoke" if smoke else "full"), device)
    components.to(torch.bfloat16 if device == "cuda" else torch.float32)
    base, refiner = build_pipelines(components)
    base.save_pretrained(folder / "base")
    refiner.save_pretrained(folder / "refiner")
    return time.perf_counter() - began


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_start(args: argparse.Namespace, models: Path, data: Path, label: str, log: Path) -> dict[str, Any]:
    port = free_port()
    px = 64 if args.smoke else 1024
    env = {
        **os.environ,
        "IMAGESMITH_BASE_MODEL": str(models / "base"),
        "IMAGESMITH_REFINER_MODEL": str(models / "refiner"),
        "IMAGESMITH_HF_OFFLINE": "true",
        "IMAGESMITH_DATA_DIR": str(data),
        "IMAGESMITH_COMPILE": args.compile,
        "IMAGESMITH_BATCH_MAX_IMAGES": str(args.batch_max),
        "IMAGESMITH_WARMUP_SIZES": f"{px}x{px}",
        "IMAGESMITH_DEFAULT_WIDTH": str(px),
        "IMAGESMITH_DEFAULT_HEIGHT": str(px),
        "IMAGESMITH_STOCK_DEFAULT_SIZE": "",
        "IMAGESMITH_COMPILE_ON_REQUEST": str(args.compile_on_request).lower(),
        "IMAGESMITH_WARMUP_ANY_SIZE": str(args.any_size).lower(),
    }
    if args.max_images_per_request is not None:  # otherwise the setting's own default
        env["IMAGESMITH_MAX_IMAGES_PER_REQUEST"] = str(args.max_images_per_request)
    started = time.perf_counter()
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "imagesmith.api.serve", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    row: dict[str, Any] = {"start": label}
    try:
        health: dict[str, Any] = {}
        while time.perf_counter() - started < args.timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}; see {log}")
            try:
                response = httpx.get(f"{url}/v1/health", timeout=5)
                health = response.json()
                if response.status_code == 200:
                    break
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        else:
            raise TimeoutError(f"not ready after {args.timeout_s}s")
        row["ready_s"] = time.perf_counter() - started
        row["health_startup"] = health.get("startup")
        row["speed_levers"] = health.get("speed_levers")
        body = {
            "prompt": "a lighthouse at dusk",
            "use_generation": True,
            "num_inference_steps": 40,
            "seed": 1,
        }
        before = time.perf_counter()
        answer = httpx.post(f"{url}/api/media/generate-image", json=body, timeout=args.timeout_s)
        answer.raise_for_status()
        row["first_image_request_s"] = time.perf_counter() - before
        row["first_image_after_process_start_s"] = time.perf_counter() - started
        later = []  # the requests after the first, one at a time: what a client waits for once the server is warm
        for seed in range(2, args.requests + 1):
            began = time.perf_counter()
            httpx.post(
                f"{url}/api/media/generate-image", json={**body, "seed": seed}, timeout=600
            ).raise_for_status()
            later.append(time.perf_counter() - began)
        row["later_requests_s"] = later
        row["second_image_request_s"] = later[0] if later else None
        row["later_requests_median_s"] = statistics.median(later) if later else None
        if args.other_size:
            width, height = (int(side) for side in args.other_size.lower().split("x"))
            other = []
            for seed in (101, 102):
                began = time.perf_counter()
                httpx.post(
                    f"{url}/api/media/generate-image",
                    json={**body, "seed": seed, "width": width, "height": height},
                    timeout=args.timeout_s,
                ).raise_for_status()
                other.append(time.perf_counter() - began)
            row["other_size_requests_s"] = other
            began = time.perf_counter()
            httpx.post(
                f"{url}/api/media/generate-image", json={**body, "seed": 103}, timeout=args.timeout_s
            ).raise_for_status()
            row["warmed_size_after_other_s"] = time.perf_counter() - began
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    print(json.dumps(row), flush=True)
    return row


def timeline(log: Path, since: int) -> list[str]:
    """The service's own start-up lines (load, each warm-up stage) written after byte `since` of the log: the
    figures that remain when a start outlasts the timeout."""
    text = log.read_bytes()[since:].decode(errors="replace") if log.exists() else ""
    keys = ("models ready", "stage ", "warm-up", "ready ", "listening")
    return [line[:200] for line in text.splitlines() if any(key in line for key in keys)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "serve-start-out"))
    parser.add_argument("--models", default=".devcache/random-sdxl")
    parser.add_argument("--data", default="", help="data dir (default: OUT/data; its compile cache decides)")
    parser.add_argument("--compile", default="default")
    parser.add_argument("--batch-max", type=int, default=8)
    # The warm-up compiles the largest pass the worker may run: batch_max or one request's images, whichever is
    # more (sources/generate.py's warm_up_batches). Only --batch-max 1 with this at 1 warms up one image alone.
    parser.add_argument(
        "--max-images-per-request", type=int, default=None, help="IMAGESMITH_MAX_IMAGES_PER_REQUEST"
    )
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=500)
    parser.add_argument("--requests", type=int, default=2, help="one-image requests after ready (at least 1)")
    parser.add_argument("--other-size", default="", help="WxH outside the warm-up: two requests there, timed")
    parser.add_argument(
        "--compile-on-request", action="store_true", help="IMAGESMITH_COMPILE_ON_REQUEST=true"
    )
    parser.add_argument("--any-size", action="store_true", help="IMAGESMITH_WARMUP_ANY_SIZE=true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = Path(args.models)
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    results["save_models_s"] = save_random_models(models, args.smoke)
    data = Path(args.data) if args.data else out / "data"
    results["compile_cache_files_before"] = sum(1 for _ in (data / "compile-cache").rglob("*"))
    results["starts"] = []
    for index in range(args.starts):
        label = "first" if index == 0 else f"start {index + 1}"
        log = out / "server.log"
        since = log.stat().st_size if log.exists() else 0
        try:
            results["starts"].append(one_start(args, models, data, label, log))
        except Exception as error:
            results["starts"].append({"start": label, "error": f"{type(error).__name__}: {error}"})
            print(results["starts"][-1], flush=True)
        results["starts"][-1]["timeline"] = timeline(log, since)
        (out / "serve_start.json").write_text(json.dumps(results, indent=1))
    print(
        f"\n{results['gpu']}, compile={args.compile}, batch_max={args.batch_max}, cache files before: "
        f"{results['compile_cache_files_before']}"
    )
    for row in results["starts"]:
        if "error" in row:
            print(f"{row['start']:8s} ERROR {row['error']}")
            for line in row["timeline"]:
                print(f"         {line}")
            continue
        print(
            f"{row['start']:8s} ready {row['ready_s']:6.1f}s  first image {row['first_image_after_process_start_s']:6.1f}s "
            f"after process start (request {row['first_image_request_s']:.2f}s, later ones median "
            f"{row['later_requests_median_s'] or float('nan'):.2f}s of {len(row['later_requests_s'])})"
            f"  health startup {row['health_startup']}"
        )
        if "other_size_requests_s" in row:
            first, second = row["other_size_requests_s"]
            print(
                f"         {args.other_size}: {first:.2f}s then {second:.2f}s; the warmed-up size after them "
                f"{row['warmed_size_after_other_s']:.2f}s (compile on request: {args.compile_on_request}, "
                f"any-size warm-up: {args.any_size})"
            )


if __name__ == "__main__":
    main()
