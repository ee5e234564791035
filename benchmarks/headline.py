"""The issue's headline tables from one device pipeline run (device_pipeline.sh's `headline` stage, seconds on the
CPU): configurations (1)-(5) from fast_path.py (its `fast-path` and `fast-path-2` stages), the queue at each
batch_max and configuration from queue_throughput.py and the service's start from serve_start.py, all measured
on one GPU by the stages before it. Markdown, ready for docs/benchmarks.md; ratios are to the peer measured in
the same run.

Usage:  python benchmarks/headline.py PIPE_DIR [--serve serve-cold] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _unet(row: dict[str, Any], role: str) -> str:
    unet = row.get("unet", {}).get(role)
    return f"{unet['gpu_ms_median']:.1f} ms ({unet['tflop_s']:.0f})" if unet else "-"


def configurations(fast: dict[str, Any]) -> list[str]:
    """Table 1: every end-to-end configuration (40-step ensemble at 1024x1024 unless named), batch 1."""
    named = [
        ("(1) the seed's settings: fp32, base 50 steps, refiner img2img 30 x 0.3", fast.get("seed_fp32")),
        ("(2) peer: diffusers fp16 ensemble, 40 steps, split 0.8", fast.get("peer_fp16_ensemble")),
        ("(3) imagesmith's default (eager bf16)", fast.get("engine_eager_ensemble")),
    ]
    for spec, row in fast.get("variants", {}).items():
        lossy = "+fp8" in spec
        label = "(5) opt-in lossy" if lossy else "(4) fastest exact"
        if "+noteg" in spec:
            label = "(4) without the text encoders' CUDA graphs"
        named.append((f"{label}: `{spec}`", row))
    peer = (fast.get("peer_fp16_ensemble") or {}).get("median_s")
    lines = [
        "| configuration | median s | min-max s | runs | peak GiB | base UNet a call (TFLOP/s) "
        "| refiner UNet a call (TFLOP/s) | vs peer | first image s | vs eager bf16: rel. L2, PSNR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in named:
        if not row or "median_s" not in row:
            lines.append(f"| {label} | not measured | | | | | | | | |")
            continue
        fidelity = row.get("fidelity_vs_eager")
        fidelity_text = (
            f"{fidelity['relative_l2_final_latents']:.2e}, {fidelity['psnr_db']:.1f} dB" if fidelity else "-"
        )
        ratio = f"{peer / row['median_s']:.2f}x" if peer else "-"
        first = f"{row['first_image_s']:.1f}" if "first_image_s" in row else "-"
        lines.append(
            f"| {label} | {row['median_s']:.3f} | {row['min_s']:.3f}-{row['max_s']:.3f} | {len(row['runs'])} "
            f"| {row['peak_gib']:.1f} | {_unet(row, 'base')} | {_unet(row, 'refine')} | {ratio} | {first} "
            f"| {fidelity_text} |"
        )
    return lines


def queue(results: dict[str, Any]) -> list[str]:
    """Table 2: images/s through the service's queue (compiled rows) and the engine alone, per batch_max."""
    rows = results.get("rows", [])
    lines = [
        "| batch_max | configuration | queue, images/s by row | encode ahead on / off (A/B rows) "
        "| text encoders eager | engine alone, images/s | GPU utilisation by row (%) | SM clock median (MHz) "
        "| GPU waited for the host (fraction of base calls, by row) | base stage, median s (by row) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # A row's config is the compiled configuration (`reduce-overhead`, `reduce-overhead+fp8`), then its A/B arm.
    configs = list(dict.fromkeys(r["config"].split(",")[0] for r in rows if r["config"] != "eager"))
    for batch, config in ((b, c) for b in sorted({r["batch_max_images"] for r in rows}) for c in configs):
        mine = [r for r in rows if r["batch_max_images"] == batch and r["config"].split(",")[0] == config]
        queued = [r for r in mine if "," not in r["config"]]  # the configuration's own rows
        alone = [r for r in mine if r["config"].endswith(",engine-alone")]
        # Run 41's arm turned encode ahead on against a default without; later runs' arm turns it off.
        ahead = [r for r in mine if r["config"].endswith(",encode-ahead")]
        no_ahead = [r for r in mine if r["config"].endswith(",no-encode-ahead")]
        eager_encoders = [r for r in mine if r["config"].endswith(",eager-encoders")]
        if not queued:
            continue
        probes = [r.get("probe", {}) for r in queued]
        clocks = [p["sm_clock_mhz_median_min"][0] for p in probes if "sm_clock_mhz_median_min" in p]
        rates = " / ".join(f"{r['images_per_s']:.2f}" for r in queued)
        alone_rates = " / ".join(f"{r['images_per_s']:.2f}" for r in alone) or "-"
        ahead_rates = (
            " / ".join(
                [f"on {r['images_per_s']:.2f}" for r in ahead]
                + [f"off {r['images_per_s']:.2f}" for r in no_ahead]
            )
            or "-"
        )
        eager_encoder_rates = " / ".join(f"{r['images_per_s']:.2f}" for r in eager_encoders) or "-"
        utilisation = " / ".join(str(p.get("gpu_utilization_pct_mean", "-")) for p in probes)
        waited = " / ".join(str(p.get("gpu_waited_for_host_fraction", "-")) for p in probes)
        clock = statistics.median(clocks) if clocks else "-"
        base = " / ".join(
            f"{r['median_stage_s']['base']:.3f}" for r in queued if "base" in r["median_stage_s"]
        )
        label = f"`{config}`" + (" (opt-in lossy)" if "+fp8" in config else "")
        lines.append(
            f"| {batch} | {label} | {rates} | {ahead_rates} | {eager_encoder_rates} | {alone_rates} | {utilisation} "
            f"| {clock} | {waited} | {base} |"
        )
    eager = [r for r in rows if r["config"] == "eager"]
    for row in eager:
        lines.append(f"| {row['batch_max_images']} | eager | {row['images_per_s']:.2f} | | | | | | | |")
    return lines


def service_start(results: dict[str, Any]) -> list[str]:
    """Table 3: the real `imagesmith serve`: ready, first image, requests over HTTP."""
    lines = [
        "| start | ready after process start (s) | warm-up (s) | first image after process start (s) "
        "| first request over HTTP (s) | later requests, median (s) |",
        "|---|---|---|---|---|---|",
    ]
    for start in results.get("starts", []):
        health = start.get("health_startup") or {}
        later = start.get("later_requests_median_s")
        lines.append(
            f"| {start.get('start')} | {start.get('ready_s', float('nan')):.1f} | {health.get('warmup_s', '-')} "
            f"| {start.get('first_image_after_process_start_s', float('nan')):.1f} "
            f"| {start.get('first_image_request_s', float('nan')):.2f} | {f'{later:.2f}' if later else '-'} |"
        )
    return lines


def fast_paths(pipe: Path) -> dict[str, Any]:
    """fast_path.py's results from the `fast-path` stage, with the `fast-path-2` stage's added (its variants
    beside the first's; the first's peer and eager rows, where it has them, win)."""
    first, second = (_load(pipe / name / "fast_path.json") for name in ("fast-path", "fast-path-2"))
    merged = {**second, **first}
    merged["variants"] = {**second.get("variants", {}), **first.get("variants", {})}
    for key in ("skipped", "errors"):
        merged[key] = {**second.get(key, {}), **first.get(key, {})}
    return merged


def headline(pipe: Path, serve: str) -> str:
    fast = fast_paths(pipe)
    versions = fast.get("versions", {})
    parts = [
        f"Measured on {versions.get('gpu', '?')}, torch {versions.get('torch', '?')}, "
        f"diffusers {versions.get('diffusers', '?')}, one pipeline run (`{pipe}`).",
        "",
        "Latency, batch 1, 1024x1024 (UNet a call: median GPU time of one call, batch 2 with CFG; TFLOP/s from "
        "the reference FLOPs a call; first image: from building the modules to the first image, compile "
        "included):",
        "",
        *configurations(fast),
        "",
        "Throughput through the service's queue, MLPerf setting (20 steps, base only, guidance 8, 1024x1024):",
        "",
        *queue(_load(pipe / "queue" / "queue_throughput.json")),
        "",
        f"The service (`imagesmith serve`, {serve}):",
        "",
        *service_start(_load(pipe / serve / "serve_start.json")),
    ]
    skipped = {**fast.get("skipped", {}), **fast.get("errors", {})}
    if skipped:
        parts += ["", f"fast_path skipped or failed: {json.dumps(skipped)}"]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipe", type=Path)
    parser.add_argument("--serve", default="serve-cold", help="the serve_start stage whose start to report")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = headline(args.pipe, args.serve)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
