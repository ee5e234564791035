"""The host's CPU budget as torch and the cgroups see it, and what a pass's CPU operators cost at each thread count.

Why: run 66 profiled 44-51 ms of one CPU `torch.cat` in each MLPerf batch on the H200 host, the GPU idle
meanwhile: diffusers' starting noise (`randn_tensor` with one CPU generator per image, then a cat of 8 bf16
tensors of 4x128x128), which this 2-core machine does in under 1 ms. The suspect is torch's intra-op team sized
by the host's cores in a container limited by a CPU quota (engine/cpu_threads.py). This prints what bounds the
threads, then times that noise, on a thread of its own as the engine's passes run, with torch's count, the
usable count, and 1.

Run: PYTHONPATH=src python benchmarks/host_threads.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from imagesmith.engine.cpu_threads import cpu_budget

SHAPE = (8, 4, 128, 128)  # MLPerf batch 8 at 1024x1024


def noise_times_ms(threads: int, repeats: int) -> dict[str, Any]:
    """randn_tensor as diffusers' SDXL pipeline calls it, on a new thread (it reads the count at its first
    parallel operator), and the cat alone."""
    result: dict[str, Any] = {}

    def work() -> None:
        torch.set_num_threads(threads)
        generators = [torch.Generator().manual_seed(seed) for seed in range(SHAPE[0])]
        whole, cat = [], []
        for _ in range(repeats):
            began = time.perf_counter()
            randn_tensor(SHAPE, generator=generators, device=torch.device("cpu"), dtype=torch.bfloat16)
            whole.append((time.perf_counter() - began) * 1e3)
            parts = [torch.randn((1, *SHAPE[1:]), generator=g, dtype=torch.bfloat16) for g in generators]
            began = time.perf_counter()
            torch.cat(parts)
            cat.append((time.perf_counter() - began) * 1e3)
        result.update(
            threads=torch.get_num_threads(),
            randn_tensor_median_ms=round(statistics.median(whole), 3),
            randn_tensor_max_ms=round(max(whole), 3),
            cat_median_ms=round(statistics.median(cat), 3),
            cat_max_ms=round(max(cat), 3),
        )

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    budget = cpu_budget()
    report: dict[str, Any] = {
        "os_cpu_count": os.cpu_count(),
        "affinity": budget.affinity,
        "cgroup_quota_cpus": budget.quota,
        "torch_default_threads": budget.torch_default,
        "usable": budget.usable,
        "torch_parallel_info": torch.__config__.parallel_info(),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "torch_parallel_info"}))
    rows = []
    for threads in dict.fromkeys([budget.torch_default, budget.usable, 1]):
        row = noise_times_ms(threads, args.repeats)
        rows.append(row)
        print(
            f"threads {row['threads']:4d}: randn_tensor median {row['randn_tensor_median_ms']:8.3f} ms "
            f"(max {row['randn_tensor_max_ms']:8.3f}), cat median {row['cat_median_ms']:8.3f} ms "
            f"(max {row['cat_max_ms']:8.3f})"
        )
    report["noise"] = rows
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "host_threads.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
