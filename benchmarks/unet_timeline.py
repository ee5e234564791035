"""Whether the GPU waits for the host between a UNet's calls: CUDA events around every call, host clocks beside.

Why: run 38's probe (benchmarks/row_probe.py) found slow queue rows with the GPU at its usual clock but busy less
of the time (80-87 % against 92-93 %), and nothing else on the host. In a row the base stage is 20 UNet calls
back to back, each a CUDA-graph replay of ~33 ms at batch 1, with the scheduler's few kernels between them. The
host can only hold the GPU up if it falls behind: if it needs longer than a call to launch the next (its Python
starved of the GIL, a slower path in the CUDA-graph trees), or if something waits for the GPU each step. This
measures it per call:
- the GPU's gap between the end of one call and the start of the next (CUDA events; ~0.1 ms when the host is
  ahead: the scheduler's kernels);
- whether the previous call had already finished on the GPU when the host launched the next one (the GPU
  waited), and the host's time from one launch to the next.

On a compiled module it is installed as the `_compiled_call_impl` wrapper (what `Module.__call__` calls when the
module is compiled), so it sits outside the compiled graph and records nothing inside it. Not sdxl_fullsize.Probe,
which times UNet calls too: its forward hooks run inside `_call_impl`, the function torch.compile traces. On an
eager module (the peer, the seed's fp32 pipelines, the eager engine) forward hooks do the same job, and the median
call's GPU time gives every configuration's achieved UNet TFLOP/s the same way (`fast_path.py`). Without CUDA (the
CPU smoke run) host clocks stand in for events, so the code path still runs; its GPU figures then mean nothing.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


class _HostEvent:
    """A CUDA event's surface on the CPU: the time it was recorded, always complete."""

    def __init__(self) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def query(self) -> bool:
        return True

    def elapsed_time(self, later: _HostEvent) -> float:
        return (later.at - self.at) * 1000


def _event() -> Any:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.Event(enable_timing=True)
    return _HostEvent()


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


class UnetTimeline:
    """Times a module's calls; `take()` returns and clears what the calls since the last `take()` showed."""

    # Two calls launched further apart than this many times the median launch interval are a stage or job
    # boundary (the text encoders, the pipeline's setup, the decode, the next job), not two steps; boundaries are
    # reported on their own. Run 40 showed why: with a fixed limit (0.2 s + a call) most job boundaries at batch 1
    # (90-230 ms) counted as steps, and the steps' gap total was mostly theirs.
    BOUNDARY_FACTOR = 1.5

    def __init__(self, module: torch.nn.Module) -> None:
        # start event, end event, host launch, host return, GPU idle before the launch
        self._calls: list[tuple[Any, Any, float, float, bool]] = []
        self._open: list[tuple[Any, float, bool]] = []  # calls begun, not yet ended
        inner = module._compiled_call_impl
        if inner is not None:
            self._inner: Callable[..., Any] = inner
            module._compiled_call_impl = self
        else:
            module.register_forward_pre_hook(lambda *_: self._begin())
            module.register_forward_hook(lambda *_: self._end())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._begin()
        out = self._inner(*args, **kwargs)
        self._end()
        return out

    def _begin(self) -> None:
        launched = time.perf_counter()
        # Queried before this call's work is queued: True means the GPU finished the last call and sat idle.
        waited = bool(self._calls) and self._calls[-1][1].query()
        start = _event()
        start.record()
        self._open.append((start, launched, waited))

    def _end(self) -> None:
        end = _event()
        end.record()
        start, launched, waited = self._open.pop()
        self._calls.append((start, end, launched, time.perf_counter(), waited))

    def take(self) -> dict[str, Any]:
        calls, self._calls = self._calls, []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        if not calls:
            return {"unet_calls": 0}
        call_ms = [start.elapsed_time(end) for start, end, *_ in calls]
        # The host's time inside a call: the launches of an eager module (where a slow host shows), the replay's
        # bookkeeping of a CUDA graph.
        host_call_ms = [(returned - launched) * 1000 for _, _, launched, returned, _ in calls]
        pairs = [
            (end.elapsed_time(start), (next_launch - launched) * 1000, next_waited)
            for (_, end, launched, _, _), (start, _, next_launch, _, next_waited) in itertools.pairwise(calls)
        ]
        # (one call: no pairs, so neither steps nor boundaries)
        step_limit_ms = (
            self.BOUNDARY_FACTOR * statistics.median(host for _, host, _ in pairs) if pairs else 0.0
        )
        steps = [pair for pair in pairs if pair[1] <= step_limit_ms]
        boundaries = [pair for pair in pairs if pair[1] > step_limit_ms]
        summary: dict[str, Any] = {
            "unet_calls": len(calls),
            "unet_gpu_ms_median": round(statistics.median(call_ms), 2),
            "unet_gpu_ms_p90_max": [round(_p90(call_ms), 2), round(max(call_ms), 2)],
            "host_call_ms_median_max": [
                round(statistics.median(host_call_ms), 2),
                round(max(host_call_ms), 2),
            ],
        }
        if steps:
            gaps_ms = [gap for gap, _, _ in steps]
            host_ms = [host for _, host, _ in steps]
            summary |= {
                "step_pairs": len(steps),
                # The GPU's time between two calls of a stage: the scheduler's kernels, plus any wait for the host.
                "gpu_gap_ms_median_p90_max": [
                    round(statistics.median(gaps_ms), 3),
                    round(_p90(gaps_ms), 3),
                    round(max(gaps_ms), 3),
                ],
                "gpu_gap_ms_total": round(sum(gaps_ms), 1),
                # The host's time from one launch to the next: at most the call's GPU time when the host keeps up.
                "host_launch_interval_ms_median_max": [
                    round(statistics.median(host_ms), 2),
                    round(max(host_ms), 2),
                ],
                "gpu_waited_for_host_fraction": round(sum(waited for _, _, waited in steps) / len(steps), 3),
            }
        if boundaries:
            summary |= {
                "boundaries": len(boundaries),
                # Between a stage's last call and the next stage's (or job's) first: GPU work of its own (the
                # decode) plus whatever the GPU waited for (text encoders, setup, the worker).
                "boundary_gpu_gap_ms_median_max": [
                    round(statistics.median(gap for gap, _, _ in boundaries), 2),
                    round(max(gap for gap, _, _ in boundaries), 2),
                ],
                "boundary_gpu_gap_ms_total": round(sum(gap for gap, _, _ in boundaries), 1),
                "boundary_host_interval_ms_median_max": [
                    round(statistics.median(host for _, host, _ in boundaries), 2),
                    round(max(host for _, host, _ in boundaries), 2),
                ],
            }
        return summary
