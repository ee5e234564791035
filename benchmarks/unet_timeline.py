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


class UnetTimeline:
    """Times a module's calls; `take()` returns and clears what the calls since the last `take()` showed."""

    # A host gap longer than this between two calls is a stage or job boundary, not a step: not counted.
    STEP_GAP_LIMIT_S = 0.2

    def __init__(self, module: torch.nn.Module) -> None:
        self._calls: list[tuple[Any, Any, float, bool]] = []  # start event, end event, host launch, GPU idle
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
        self._calls.append((start, end, launched, waited))

    def take(self) -> dict[str, Any]:
        calls, self._calls = self._calls, []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        if len(calls) < 2:
            return {"unet_calls": len(calls)}
        call_ms = [start.elapsed_time(end) for start, end, _, _ in calls]
        boundary_s = self.STEP_GAP_LIMIT_S + statistics.median(call_ms) / 1000
        gaps_ms, host_ms, waited = [], [], 0
        for (_, end, launched, _), (start, _, next_launch, next_waited) in itertools.pairwise(calls):
            if next_launch - launched > boundary_s:
                continue  # the next stage or job
            gaps_ms.append(end.elapsed_time(start))
            host_ms.append((next_launch - launched) * 1000)
            waited += next_waited
        summary: dict[str, Any] = {
            "unet_calls": len(calls),
            "unet_gpu_ms_median": round(statistics.median(call_ms), 2),
        }
        if gaps_ms:
            summary |= {
                "step_pairs": len(gaps_ms),
                # The GPU's time between two calls of a stage: the scheduler's kernels, plus any wait for the host.
                "gpu_gap_ms_median_p90_max": [
                    round(statistics.median(gaps_ms), 3),
                    round(sorted(gaps_ms)[int(0.9 * (len(gaps_ms) - 1))], 3),
                    round(max(gaps_ms), 3),
                ],
                "gpu_gap_ms_total": round(sum(gaps_ms), 1),
                # The host's time from one launch to the next: at most the call's GPU time when the host keeps up.
                "host_launch_interval_ms_median_max": [
                    round(statistics.median(host_ms), 2),
                    round(max(host_ms), 2),
                ],
                "gpu_waited_for_host_fraction": round(waited / len(gaps_ms), 3),
            }
        return summary
