"""What the machine did while a benchmark row ran: GPU clocks and utilisation, host CPU, Python's collector.

Why: the first queue row after a compile runs 7-8 % slower than every later row, whatever its settings (runs
34 and 36 in docs/benchmarks.md), and nothing measured so far says where the time goes. A row's probe tells
the candidates apart:
- lower SM clocks or a throttle reason at the same utilisation: the GPU itself ran slower;
- lower GPU utilisation at the same clocks: the GPU waited for the host (launches, a sync, a lock);
- more host CPU busy outside this process: something else on the machine (compile workers) took the cores;
- more collections of the oldest generation: Python's collector over the compile's objects.

The GPU side reads NVML through ctypes (the driver's libnvidia-ml, present wherever CUDA runs; no Python
package needed), sampled by a thread every 0.1 s: microseconds a sample, so it does not disturb the row it
measures. Where NVML is missing (the CPU, CI) the GPU fields are left out.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import operator
import os
import statistics
import threading
import time
from typing import Any

_NVML_CLOCK_SM = 1
_NVML_TEMPERATURE_GPU = 0


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Nvml:
    """The few NVML calls the probe needs, on the first GPU NVML lists (the device machines have one)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)) != 0:
            raise OSError("no NVML device 0")
        # Renamed in CUDA 12.2's NVML ("throttle" -> "clocks event"); older drivers have only the first name.
        names = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
        self._reasons = next(getattr(self.lib, name) for name in names if hasattr(self.lib, name))

    def sample(self) -> tuple[float, float, float, float, int]:
        """SM clock (MHz), utilisation (%), power (W), temperature (C), active clock-event reasons (bits)."""
        clock, power, temperature = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
        reasons = ctypes.c_ulonglong()
        utilization = _Utilization()
        self.lib.nvmlDeviceGetClockInfo(self.handle, _NVML_CLOCK_SM, ctypes.byref(clock))
        self.lib.nvmlDeviceGetUtilizationRates(self.handle, ctypes.byref(utilization))
        self.lib.nvmlDeviceGetPowerUsage(self.handle, ctypes.byref(power))
        self.lib.nvmlDeviceGetTemperature(self.handle, _NVML_TEMPERATURE_GPU, ctypes.byref(temperature))
        self._reasons(self.handle, ctypes.byref(reasons))
        return clock.value, utilization.gpu, power.value / 1000, temperature.value, reasons.value


def _host_cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of every core since boot, from /proc/stat's first line."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class RowProbe:
    """Use as `with RowProbe() as probe: ...`; then `probe.summary()` is a dict for the row's JSON."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float, float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._nvml: _Nvml | None = _Nvml()
        except OSError:
            self._nvml = None

    def __enter__(self) -> RowProbe:
        self._began = time.perf_counter()
        self._cpu_began = time.process_time()
        self._host_began = _host_cpu_jiffies()
        self._gc_began = [generation["collections"] for generation in gc.get_stats()]
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._sample, name="row-probe", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        assert self._nvml is not None
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._nvml.sample())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._wall = time.perf_counter() - self._began
        self._cpu = time.process_time() - self._cpu_began
        busy, total = _host_cpu_jiffies()
        self._host_busy = (busy - self._host_began[0]) / max(1, total - self._host_began[1])
        self._gc = [
            generation["collections"] - began
            for generation, began in zip(gc.get_stats(), self._gc_began, strict=True)
        ]

    def summary(self) -> dict[str, Any]:
        cores = os.cpu_count() or 1
        found: dict[str, Any] = {
            "wall_s": round(self._wall, 3),
            # Cores' worth of CPU: this process's, and the whole host's (the difference is everything else).
            "process_cpu_cores": round(self._cpu / self._wall, 2),
            "host_cpu_busy_cores": round(self._host_busy * cores, 2),
            "gc_collections_by_generation": self._gc,
        }
        if self.samples:
            clocks, utilization, power, temperature, reasons = zip(*self.samples, strict=True)
            found |= {
                "gpu_samples": len(self.samples),
                "sm_clock_mhz_median_min": [statistics.median(clocks), min(clocks)],
                "gpu_utilization_pct_mean": round(statistics.fmean(utilization), 1),
                "power_w_median": round(statistics.median(power), 1),
                "temperature_c_max": max(temperature),
                # OR of every sample's reasons (NVML's bits: 0x1 idle, 0x4 sw power cap, 0x20 sw thermal...).
                "clock_event_reasons_seen": hex(functools.reduce(operator.or_, reasons, 0)),
            }
        return found
