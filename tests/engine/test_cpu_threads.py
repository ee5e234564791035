"""torch's CPU threads bounded by the CPUs the process may use: the cgroup quota read from v2 and v1 trees (the
tightest along the process's cgroup and its parents), the plan's choice and reason, and the engine setting it
on its GPU thread, where the passes run."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.cpu_threads import CpuBudget, cgroup_cpu_quota, choose_cpu_threads
from imagesmith.engine.hardware import plan_hardware, probe_device


def cgroup_tree(tmp_path: Path, files: dict[str, str], own: str) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup with `files` (relative path -> content) and a /proc/self/cgroup naming `own`."""
    root = tmp_path / "cgroup"
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own)
    return root, proc


def test_a_v2_quota_is_read_in_cpus(tmp_path: Path) -> None:
    # What `docker --cpus 16` leaves in a container with its own cgroup namespace: its files at the root.
    root, proc = cgroup_tree(tmp_path, {"cpu.max": "1600000 100000\n"}, "0::/\n")
    assert cgroup_cpu_quota(root, proc) == 16.0


def test_no_quota_is_none(tmp_path: Path) -> None:
    root, proc = cgroup_tree(tmp_path, {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cgroup_cpu_quota(root, proc) is None
    root, proc = cgroup_tree(tmp_path / "empty", {}, "0::/\n")
    assert cgroup_cpu_quota(root, proc) is None


def test_the_tightest_quota_along_the_cgroups_parents_wins(tmp_path: Path) -> None:
    # A pod limited to 6 CPUs whose container says 8: the pod's limit is the one that throttles.
    files = {
        "kubepods/pod1/cpu.max": "600000 100000",
        "kubepods/pod1/ctr/cpu.max": "800000 100000",
        "kubepods/cpu.max": "max 100000",
    }
    root, proc = cgroup_tree(tmp_path, files, "0::/kubepods/pod1/ctr\n")
    assert cgroup_cpu_quota(root, proc) == 6.0


def test_a_v1_quota_is_read_from_the_cpu_controller(tmp_path: Path) -> None:
    files = {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    }
    own = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    root, proc = cgroup_tree(tmp_path, files, own)
    assert cgroup_cpu_quota(root, proc) == 2.5
    # -1 is v1's "no limit".
    (root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(root, proc) is None


def test_usable_cpus_are_the_least_bound_and_at_least_one() -> None:
    assert CpuBudget(torch_default=64, affinity=64, quota=16.0).usable == 16
    assert CpuBudget(torch_default=64, affinity=12, quota=16.0).usable == 12
    assert CpuBudget(torch_default=8, affinity=64, quota=None).usable == 8
    assert CpuBudget(torch_default=64, affinity=None, quota=2.5).usable == 2  # half a CPU more is throttled
    assert CpuBudget(torch_default=64, affinity=64, quota=0.5).usable == 1


def test_the_plan_lowers_torchs_count_to_the_quota_and_says_why() -> None:
    reasons: list[str] = []
    assert choose_cpu_threads(0, CpuBudget(64, 64, 16.0), reasons) == 16
    assert reasons == ["CPU threads: 16, not torch's 64 (a CPU quota of 16)"]
    reasons.clear()
    assert choose_cpu_threads(0, CpuBudget(64, 12, 16.0), reasons) == 12
    assert "12 CPUs in the affinity mask" in reasons[0]


def test_nothing_changes_where_nothing_bounds_torchs_count() -> None:
    reasons: list[str] = []
    assert choose_cpu_threads(0, CpuBudget(8, 16, None), reasons) == 0
    assert reasons == []


def test_the_setting_wins() -> None:
    reasons: list[str] = []
    assert choose_cpu_threads(3, CpuBudget(64, 64, 16.0), reasons) == 3
    assert reasons == ["CPU threads: 3, from settings"]


def test_the_setting_reaches_the_plan() -> None:
    plan = plan_hardware(probe_device("cpu"), Settings(device="cpu", cpu_threads=1))
    assert plan.cpu_threads == 1
    assert "CPU threads: 1, from settings" in plan.summary()


def test_a_negative_setting_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="cpu_threads"):
        Settings(cpu_threads=-1)


@pytest.fixture
def restores_cpu_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restores_cpu_threads")
def test_the_engine_sets_the_count_on_its_gpu_thread(tiny_engine: Engine) -> None:
    # A thread keeps the count it had at its first parallel operator: the GPU thread, where passes run, must
    # get it before its first. Engine(...) on the tiny engine's models builds an engine with its own GPU thread.
    engine = Engine(tiny_engine.models, dataclasses.replace(tiny_engine.plan, cpu_threads=1))
    try:
        assert engine._gpu.run(torch.get_num_threads) == 1
        assert torch.get_num_threads() == 1
    finally:
        engine._gpu.close()


@pytest.mark.usefixtures("restores_cpu_threads")
def test_an_engine_with_no_count_leaves_torchs(tiny_engine: Engine) -> None:
    torch.set_num_threads(2)
    engine = Engine(tiny_engine.models, dataclasses.replace(tiny_engine.plan, cpu_threads=0))
    try:
        assert engine._gpu.run(torch.get_num_threads) == 2
    finally:
        engine._gpu.close()
