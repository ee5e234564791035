"""On a CUDA GPU: `imagesmith bench` runs the tiny model there and reports the GPU's peak memory of the timed
passes (on the CPU it reports none), and its queue row's jobs succeed there (the pinned pixel buffer, the
finishing thread's files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda_reports_its_peak_memory(tiny_model_home: Path) -> None:
    env = {**os.environ, "IMAGESMITH_DATA_DIR": str(tiny_model_home), "IMAGESMITH_DEVICE": "cuda"}
    args = [
        "bench",
        "--model",
        "tiny",
        "--preset",
        "mlperf",
        "--batch",
        "2",
        "--runs",
        "2",
        "--queue",
        "4",
        "--json",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "imagesmith.cli", *args, "--width", "128", "--height", "128"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["plan"].startswith("device=cuda") and report["images_made"] == 4
    assert 0 < report["peak_gpu_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    assert report["queue"]["all_succeeded"] and report["queue"]["batch_sizes_seen"] == [2]
