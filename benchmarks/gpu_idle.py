"""Where the GPU sits idle during a few calls: the profiled kernel timeline, its busy time, and its longest gaps,
each with the kernels around it and what the host was doing meanwhile.

Why: at the MLPerf setting a batch of 8 took 4.13 s (run 63) while its GPU work adds up to ~3.9 s (20 base UNet
calls of 180.5 ms on the GPU, 8 decodes of ~35.6 ms alone): ~0.2 s a batch, 5 %, with the GPU waiting, more
than the 2.6 % that 2.0 images/s lacks. Stage clocks cannot say where: a stage's host clock runs while the GPU
still works on the last one. The profiler's device events (kernels, copies, memsets; those replayed inside CUDA
graphs too) give the GPU's own timeline; merged, the holes in it are the idle time, and the host's operators
that start inside a hole name its cause (a synchronising copy, the tokenizers, Python between batches).

Several calls in a row, so the gap between one call's last kernel and the next one's first (the host's work
after the result and before the next launch) is measured too; `fn` is called `calls` times.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

GAP_THRESHOLD_US = 200.0  # shorter holes are launch latencies between kernels, listed only in the total


def merged_busy(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Device activity intervals (start, end), possibly overlapping (several streams), as disjoint busy spans."""
    spans: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def host_inside(host: list[tuple[float, float, str]], start: float, end: float) -> list[str]:
    """What the host ran during a hole: the events overlapping it, most overlap first, leaving out those over
    4x the hole's length (the frames around everything: the pass, the pipeline's call) and those that hold the
    whole hole and are over 1.5x its length (with Python's functions, the callers of what did the work)."""
    length = end - start
    overlaps = [
        (min(e, end) - max(s, start), name)
        for s, e, name in host
        if e > start
        and s < end
        and e - s <= 4 * length
        and not (s <= start and e >= end and e - s > 1.5 * length)
    ]
    # Each name once, with its longest overlap and how many events it had: run 67's "aten::randn (2.5 ms)" was
    # the longest of 8 draws that took ~15-19 ms together, which the line did not say.
    named: dict[str, float] = {}
    counts = Counter(name for _, name in overlaps)
    for overlap, name in sorted(overlaps, reverse=True):
        named.setdefault(name, overlap)
    return [
        f"{name} ({overlap / 1e3:.1f} ms{f', x{counts[name]}' if counts[name] > 1 else ''})"
        for name, overlap in list(named.items())[:8]
    ]


def idle_gaps(
    device: list[tuple[float, float, str]],
    host: list[tuple[float, float, str]],
    threshold_us: float,
    top: int,
) -> dict[str, Any]:
    """From device events (start us, end us, name) and host events (start us, end us, name: operators, and
    Python functions when profiled with stacks): the busy and idle totals between the first device event and the
    last, and the `top` longest holes of at least `threshold_us`, each with what the host ran meanwhile."""
    if not device:
        return {"device_events": 0}
    spans = merged_busy([(start, end) for start, end, _ in device])
    first, last = spans[0][0], spans[-1][1]
    busy = sum(end - start for start, end in spans)
    by_end = sorted(device, key=lambda event: event[1])
    by_start = sorted(device)
    holes: list[dict[str, Any]] = []
    for (_, previous_end), (next_start, _) in itertools.pairwise(spans):
        if next_start - previous_end < threshold_us:
            continue
        before = max((e for e in by_end if e[1] <= previous_end), key=lambda e: e[1])
        after = min((e for e in by_start if e[0] >= next_start), key=lambda e: e[0])
        ops = Counter(name for at, _, name in host if previous_end <= at < next_start)
        holes.append(
            {
                "at_ms": round((previous_end - first) / 1e3, 2),
                "idle_ms": round((next_start - previous_end) / 1e3, 3),
                "after_kernel": before[2][:90],
                "before_kernel": after[2][:90],
                "host_ops": [f"{name} x{count}" for name, count in ops.most_common(6)],
                "host_during": host_inside(host, previous_end, next_start),
            }
        )
    long_idle = sum(float(hole["idle_ms"]) for hole in holes)
    return {
        "device_events": len(device),
        "span_ms": round((last - first) / 1e3, 2),
        "busy_ms": round(busy / 1e3, 2),
        "idle_ms": round((last - first - busy) / 1e3, 2),
        f"idle_in_holes_over_{threshold_us:.0f}us_ms": round(long_idle, 2),
        "holes": len(holes),
        "longest_holes": sorted(holes, key=lambda hole: -float(hole["idle_ms"]))[:top],
    }


def profile_idle(
    fn: Callable[[], object], calls: int = 2, top: int = 12, with_stack: bool = False
) -> dict[str, Any]:
    """Profile `fn` called `calls` times (GPU and host operators) and report the GPU's idle time (idle_gaps).
    `with_stack`: record every Python function too (torch's Python tracer), so a hole where no torch operator
    ran (run 64's 66 ms before a pass's first UNet call) shows which Python ran in it; it slows the host, so
    the holes grow, and one call is enough."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, with_stack=with_stack, **all_threads()) as prof:
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if with_stack:
        device, host = trace_events(prof)
    else:
        device, host = operator_events(prof)
    report = idle_gaps(device, host, GAP_THRESHOLD_US, top)
    report["calls"] = calls
    return report


def trace_events(prof: Any) -> tuple[list[tuple[float, float, str]], list[tuple[float, float, str]]]:
    """Device and host events from the exported trace, which holds the Python tracer's functions: the
    operator list (`prof.events()`) leaves them out, so run 66's profile with stacks named only operators."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    device: list[tuple[float, float, str]] = []
    host: list[tuple[float, float, str]] = []
    for event in trace.get("traceEvents", []):
        if event.get("ph") != "X" or "dur" not in event:
            continue
        start, end = float(event["ts"]), float(event["ts"]) + float(event["dur"])
        category = event.get("cat", "")
        if category in ("kernel", "gpu_memcpy", "gpu_memset"):
            if end > start:
                device.append((start, end, event.get("name", "")))
        elif category in ("cpu_op", "python_function", "cuda_runtime", "user_annotation"):
            host.append((start, end, event.get("name", "")))
    return device, host


def operator_events(prof: Any) -> tuple[list[tuple[float, float, str]], list[tuple[float, float, str]]]:
    device: list[tuple[float, float, str]] = []
    host: list[tuple[float, float, str]] = []
    for event in prof.events():
        start, end = event.time_range.start, event.time_range.end
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if end > start:
                device.append((start, end, event.name))
        else:
            host.append((start, end, event.name))
    return device, host


def all_threads() -> dict[str, Any]:
    """The profiler's option to record every thread's operators. Without it only the thread that starts the
    profiler is seen, and the engine runs its passes on a thread of its own (engine/gpu_thread.py): run 64's
    holes listed only the CUDA runtime's calls (which CUPTI sees from any thread), as if no operator ran."""
    try:
        return {"experimental_config": torch._C._profiler._ExperimentalConfig(profile_all_threads=True)}
    except TypeError:  # a torch without the option
        return {}


def print_idle(report: dict[str, Any], label: str) -> None:
    if not report.get("device_events"):
        print(f"{label}: no device events (no GPU)", flush=True)
        return
    print(
        f"{label}: GPU span {report['span_ms']:.1f} ms over {report['calls']} calls, busy {report['busy_ms']:.1f}, "
        f"idle {report['idle_ms']:.1f} ms ({report['holes']} holes over {GAP_THRESHOLD_US:.0f} us)",
        flush=True,
    )
    for hole in report["longest_holes"]:
        print(
            f"  at {hole['at_ms']:9.2f} ms idle {hole['idle_ms']:8.3f} ms | after {hole['after_kernel'][:50]} | "
            f"before {hole['before_kernel'][:50]} | host: {', '.join(hole['host_ops'][:4])}",
            flush=True,
        )
        if hole["host_during"]:
            print(f"      host during: {'; '.join(hole['host_during'][:4])}", flush=True)
