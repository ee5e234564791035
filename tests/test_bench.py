"""`imagesmith bench` as a user runs it: a real process, the tiny model, the report on stdout."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagesmith.bench import BenchReport
from imagesmith.jobs.queue_timing import PassClock
from tests.test_cli import run_cli


def bench(home: Path, *args: str) -> dict:
    done = run_cli("bench", "--width", "64", "--height", "64", "--json", *args, home=home)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_ensemble_preset_times_each_pass_through_both_stages(tiny_model_home: Path) -> None:
    report = bench(tiny_model_home, "--runs", "3", "--steps", "10")
    assert (report["preset"], report["batch"], report["steps"], report["width"]) == ("ensemble", 1, 10, 64)
    assert len(report["runs_s"]) == 3 and report["images_made"] == 3
    assert report["median_s"] == pytest.approx(statistics.median(report["runs_s"]), abs=1e-4)
    assert report["min_s"] <= report["median_s"] <= report["max_s"]
    assert report["images_per_s"] == pytest.approx(1 / report["median_s"], rel=1e-3)
    assert set(report["stage_median_s"]) == {"base", "refine", "decode"}
    # The first image comes after the models loaded and the warm-up ran, counted from the process's start.
    assert report["first_image_after_start_s"] >= report["load_s"] + report["warmup_s"]
    assert report["plan"].startswith("device=cpu") and report["peak_gpu_gib"] is None
    # Each timed pass's prompt was encoded between the steps of the pass before it, as the service's queue does.
    assert report["prompts_encoded_ahead"] == 3
    assert report["queue"] is None  # no --queue: no queue row


def test_the_mlperf_preset_runs_batched_base_only_passes(tiny_model_home: Path) -> None:
    report = bench(tiny_model_home, "--preset", "mlperf", "--batch", "3", "--runs", "2", "--steps", "4")
    assert (report["preset"], report["batch"], report["steps"]) == ("mlperf", 3, 4)
    assert report["images_made"] == 6  # two passes of three images each
    assert report["images_per_s"] == pytest.approx(3 / report["median_s"], rel=1e-3)
    assert set(report["stage_median_s"]) == {"base", "decode"}
    assert report["prompts_encoded_ahead"] == 6  # a prompt of its own for every image, each one ready in time


def test_images_per_second_is_the_batch_over_the_median_the_report_shows() -> None:
    """Two runs' median is their mean, a decimal longer than the runs: CI once saw 64.8649 images/s reported
    beside a median of 0.0462 s (3 / 0.0462 = 64.935) when both runs were short."""
    report = BenchReport("mlperf", 3, 64, 64, 4, "device=cpu", [], 0.0, 0.0, 0.0, runs_s=[0.0462, 0.0463])
    shown = report.as_dict()
    assert shown["median_s"] == round(0.04625, 4)
    assert shown["images_per_s"] == pytest.approx(3 / shown["median_s"], rel=1e-5)


def test_progress_goes_to_stderr_and_the_table_to_stdout(tiny_model_home: Path) -> None:
    done = run_cli(
        "bench", "--width", "64", "--height", "64", "--runs", "2", "--steps", "6", home=tiny_model_home
    )
    assert done.returncode == 0, done.stderr
    assert "warming up at 64x64" in done.stderr and "timed passes" in done.stderr
    assert "a pass: median" in done.stdout and "images/s" in done.stdout and "warming up" not in done.stdout
    assert "prompts: 2 encoded during the pass before theirs" in done.stdout


def test_the_queue_row_sends_jobs_through_the_services_own_queue(tiny_model_home: Path) -> None:
    args = ("--preset", "mlperf", "--batch", "2", "--runs", "1", "--steps", "3", "--queue", "6")
    row = bench(tiny_model_home, *args)["queue"]
    # Six one-image jobs through the SQLite store, the worker and the finishing thread, in passes of two.
    assert row["jobs"] == 6 and row["all_succeeded"] and row["batch_sizes_seen"] == [2]
    assert len(row["finished_s"]) == 6 and row["finished_s"] == sorted(row["finished_s"])
    assert row["images_per_s"] == pytest.approx(6 / row["wall_s"], rel=1e-3)
    assert row["steady_images_per_s"] > 0  # three passes: the last two after the first's end
    assert set(row["median_stage_s"]) == {"base", "decode"}
    # One base-stage time per pass, in the order they ran: three passes of two.
    assert len(row["base_s_by_pass"]) == 3 and all(seconds > 0 for seconds in row["base_s_by_pass"])
    # Each pass's own time and the worker's between them, read around the engine's generate_batch.
    assert len(row["pass_s"]) == 3 and all(seconds > 0 for seconds in row["pass_s"])
    assert len(row["between_passes_ms"]) == 2 and all(ms >= 0 for ms in row["between_passes_ms"])
    assert sum(row["pass_s"]) + sum(row["between_passes_ms"]) / 1000 <= row["wall_s"]
    # The store's claims that took jobs: each pass's head, then its company (the second of a pass's two jobs,
    # already queued); and the store's disk's fsync: where the time between passes may go.
    assert len(row["claim_ms"]) == 6 and all(ms > 0 for ms in row["claim_ms"]) and row["fsync_ms"] >= 0


def test_with_encode_ahead_off_each_pass_encodes_its_own_prompts(
    tiny_model_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGESMITH_ENCODE_AHEAD", "false")
    report = bench(tiny_model_home, "--runs", "2", "--steps", "6")
    assert report["prompts_encoded_ahead"] is None and report["images_made"] == 2
    assert "encode ahead" not in " ".join(report["levers"])


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--runs", "0"), "--runs"),
        (("--queue", "-1"), "--queue"),
        (("--queue", "99999999999"), "--queue"),  # its bodies were all made first: 19 GB and no job run
        (("--batch", "0"), "--batch"),
        (("--width", "60"), "--width"),
        (("--steps", "0"), "--steps"),
        (("--steps", "1"), "--steps"),  # the ensemble's refiner would get no step
    ],
)
def test_bad_input_names_the_option(tiny_model_home: Path, args: tuple[str, ...], option: str) -> None:
    done = run_cli("bench", *args, home=tiny_model_home)
    assert done.returncode == 2
    assert f"imagesmith bench: error: {option}:" in done.stderr
    assert "Traceback" not in done.stderr


def test_models_that_cannot_load_end_in_one_clear_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "IMAGESMITH_DATA_DIR": str(tmp_path),
        "IMAGESMITH_DEVICE": "cpu",
        "IMAGESMITH_BASE_MODEL": str(tmp_path / "no-such-model"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "imagesmith.cli", "bench", "--model", "sdxl", "--runs", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "imagesmith bench: cannot start the engine: could not load the base model" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_pass_clock_times_each_pass_and_the_gap_and_hands_the_method_back() -> None:
    class Passes:
        def generate_batch(self, items: list[int]) -> list[int]:
            time.sleep(0.01)
            return items

    engine = Passes()
    began = time.perf_counter()
    with PassClock(engine) as clock:  # type: ignore[arg-type]
        assert engine.generate_batch([1]) == [1]
        time.sleep(0.03)  # the worker's time between two passes
        engine.generate_batch([2])
    assert "generate_batch" not in vars(engine)  # the class's method again
    row = clock.row(since=began)
    assert len(row["pass_s"]) == 2 and all(seconds >= 0.01 for seconds in row["pass_s"])
    assert len(row["between_passes_ms"]) == 1 and row["between_passes_ms"][0] >= 30
    assert clock.row(since=time.perf_counter()) == {"pass_s": [], "between_passes_ms": []}


def test_nested_pass_clocks_each_time_the_passes_and_hand_back_what_they_found() -> None:
    class Passes:
        def generate_batch(self, items: list[int]) -> list[int]:
            return items

    engine = Passes()
    began = time.perf_counter()
    with PassClock(engine) as outer:  # type: ignore[arg-type]
        with PassClock(engine) as inner:  # type: ignore[arg-type]
            engine.generate_batch([1])
        engine.generate_batch([2])  # the outer clock's wrapper is back
    assert "generate_batch" not in vars(engine)
    assert len(inner.row(since=began)["pass_s"]) == 1 and len(outer.row(since=began)["pass_s"]) == 2


def test_the_queue_line_says_where_the_time_between_passes_goes() -> None:
    from imagesmith.bench import BenchReport

    report = BenchReport(
        preset="mlperf",
        batch=8,
        width=64,
        height=64,
        steps=3,
        plan="device=cpu",
        levers=[],
        load_s=1.0,
        warmup_s=1.0,
        first_image_after_start_s=3.0,
        runs_s=[1.0],
        queue={
            "jobs": 32,
            "wall_s": 4.2,
            "images_per_s": 7.6,
            "batch_sizes_seen": [8],
            "all_succeeded": True,
            "between_passes_ms": [20.0, 30.0, 24.0],
            "claim_ms": [2.0, 4.0, 3.0, 5.0],
            "fsync_ms": 1.25,
        },
    )
    (line,) = [line for line in report.lines() if line.startswith("through the service's queue")]
    assert "the worker's time between passes 24.0 ms (a claim's commit 3.5 ms; an fsync here 1.25 ms)" in line
    report.queue = {**(report.queue or {}), "claim_ms": []}  # an older row: no claim column, no parenthesis
    (line,) = [line for line in report.lines() if line.startswith("through the service's queue")]
    assert line.endswith("between passes 24.0 ms, all succeeded")
