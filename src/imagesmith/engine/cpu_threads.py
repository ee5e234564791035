"""How many threads torch's CPU operators may use: no more than the CPUs this process can really run on.

Why: torch sizes its intra-op pool (OpenMP) by the cores it sees. A container limited by a CPU quota (cgroup
`cpu.max`, what `docker --cpus` and Kubernetes CPU limits set) rather than by a CPU set still sees every core of
its host, so a parallel operator starts a team of, say, 64 threads with 16 CPUs' worth of time: once the quota
of a scheduling period is spent, the whole process is throttled until the next period, and the operator's
threads wait at its barrier meanwhile. A GPU pass does little on the CPU, but what it does sits on the critical
path with the GPU waiting.

Measured so far: run 66 profiled one CPU `torch.cat` of 44-51 ms in an MLPerf batch on the H200 host and this
was the suspect, but run 67 found that host without a quota (16 CPUs, 16 in the affinity mask, torch's 16
threads), so there the plan changes nothing, and the cat was fast again (0.35 ms median). The guard is for the
containers that do set a quota, where torch's count is the host's; its gain there is unmeasured.

The count is the least of: torch's own default, the CPUs in the process's affinity mask, and the cgroup's CPU
quota (v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) along the process's cgroup and its
parents. `IMAGESMITH_CPU_THREADS` sets it outright.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """What bounds the CPU threads: each figure None when that bound is absent."""

    torch_default: int
    affinity: int | None
    quota: float | None  # CPUs' worth of time per period, from the cgroups

    @property
    def usable(self) -> int:
        """Threads that can run at once without being throttled: at least 1."""
        bounds = [self.torch_default]
        if self.affinity is not None:
            bounds.append(self.affinity)
        if self.quota is not None:
            bounds.append(max(1, math.floor(self.quota)))
        return max(1, min(bounds))


def _quota_v2(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _quota_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _own_cgroup_paths(proc_cgroup: Path) -> list[str]:
    """The process's cgroup paths from /proc/self/cgroup: v2's "0::/path" and v1's cpu controller line."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    paths = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and (parts[1] == "" or "cpu" in parts[1].split(",")):
            paths.append(parts[2])
    return paths


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota on this process's cgroup or any of its parents, in CPUs; None when unlimited.
    Inside a container the process's own cgroup is usually the mount's root, whose files are then its own."""
    quotas: list[float] = []
    mounts = [root, root / "cpu", root / "cpu,cpuacct"]
    for cgroup in _own_cgroup_paths(proc_cgroup) or ["/"]:
        relative = Path(cgroup.lstrip("/"))
        for mount in mounts:
            directory = mount / relative
            while True:
                for read in (_quota_v2, _quota_v1):
                    quota = read(directory)
                    if quota is not None:
                        quotas.append(quota)
                if directory == mount or mount not in directory.parents:
                    break
                directory = directory.parent
    return min(quotas) if quotas else None


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> CpuBudget:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return CpuBudget(torch.get_num_threads(), affinity, cgroup_cpu_quota(root, proc_cgroup))


def choose_cpu_threads(setting: int, budget: CpuBudget, reasons: list[str]) -> int:
    """The intra-op thread count for the plan: the setting when given, else the usable CPUs. 0 leaves torch's
    own count (nothing bounds it lower), so an engine changes nothing it does not need to."""
    if setting > 0:
        reasons.append(f"CPU threads: {setting}, from settings")
        return setting
    usable = budget.usable
    if usable >= budget.torch_default:
        return 0
    why = (
        f"a CPU quota of {budget.quota:g}"
        if budget.quota is not None and math.floor(budget.quota) == usable
        else f"{budget.affinity} CPUs in the affinity mask"
    )
    reasons.append(f"CPU threads: {usable}, not torch's {budget.torch_default} ({why})")
    return usable


def apply_cpu_threads(count: int) -> None:
    """Set torch's intra-op threads for the calling thread and every thread that has not run a parallel
    operator yet (torch reads the process-wide count on a thread's first one). 0: leave them. Set even when
    the calling thread already has `count`: the process-wide count may differ from it."""
    if count > 0:
        torch.set_num_threads(count)
