"""`imagesmith bench`: how fast this machine serves with these settings, measured the way docs/benchmarks.md does.

Why: a user choosing settings (compile, fp8, batch size) wants their own card's figures, with their own weights,
not an H200's with random ones. The command starts the engine from the settings as the service does, warms it
up as the service does (compiling when a compile mode is set: the cold start a server would pay), then times
whole passes: the 40-step ensemble of one image (`--preset ensemble`), or the MLPerf setting, 20 base steps at
guidance 8 (`--preset mlperf`), at the batch asked for. Every image has a prompt of its own, as a stream of new
requests does, so the prompt cache does not make the figures look better than traffic would; and, as the
service's worker does with its queue, the next pass's prompts are encoded between the running pass's steps
(IMAGESMITH_ENCODE_AHEAD), so the figures are not worse than the service's either.

Reported: the time to load, to warm up and to the first image from process start; each timed pass's seconds,
their median and spread, images per second; each stage's median; the GPU's peak memory during the timed passes.
With --queue N, then N one-image jobs through the service's own queue on the warm engine (jobs/queue_timing.py):
the images per second a server gets, whole and in steady state, its SQLite store and PNG files included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from imagesmith import STARTED_AT
from imagesmith.config import MAX_BATCH_IMAGES, ModelPreset, Settings, get_settings, prepared_data_dir
from imagesmith.option_errors import report_option_errors
from imagesmith.schemas import GenerationRequest, RefineMode

# SDXL's documented ensemble and MLPerf's SDXL setting: the two docs/benchmarks.md measures on an H200.
PRESETS: dict[str, dict[str, Any]] = {
    # high_noise_frac left at the schema's default, 0.8, the documented split: unset, so a --steps that leaves
    # a stage with no step blames --steps.
    "ensemble": {"num_inference_steps": 40, "refine_mode": RefineMode.ENSEMBLE},
    "mlperf": {"num_inference_steps": 20, "refine_mode": RefineMode.NONE, "guidance_scale": 8.0},
}
DEFAULT_BATCH = {"ensemble": 1, "mlperf": 8}
PROMPT = "a lighthouse on a rocky coast at dawn, detailed photograph"
# The CLI option for each request field it sets, so a validation error names what the user typed.
OPTION_FOR_FIELD = {
    "num_inference_steps": "--steps",
    "width": "--width",
    "height": "--height",
}


# The most jobs `--queue` sends: far past any steady state a queue row needs (a burst of 32 finds it), and few
# enough that their request bodies, all made before the first job, fit in memory.
MAX_QUEUE_JOBS = 100_000


class EngineDidNotStart(RuntimeError):
    """The engine could not start (models, device, plan): said apart from a failed pass."""


class BenchProgress:
    """What the command shows while it works: a line per phase, the warm-up's passes, a bar over the timed
    passes. All on stderr, so stdout stays clean for --json."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self._warm_up_pass = ""
        self._bar: Any = None

    def phase(self, line: str) -> None:
        self._say(line)

    def warm_up(self, message: str) -> None:
        # The warm-up reports every step ("warm-up 1 of 2 (1024x1024, batch 1): base step 3 of 40 done"); one
        # line per warm-up pass is enough, the compile happening inside the first step of each.
        where = message.split(": ", 1)[0]
        if where != self._warm_up_pass:
            self._warm_up_pass = where
            self._say(where)

    def timed_pass(self, number: int, total: int, seconds: float) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc="timed passes", unit="pass", file=sys.stderr, dynamic_ncols=True
            )
        self._bar.set_postfix_str(f"last {seconds:.3f}s")
        self._bar.update(1)
        if number == total:
            self._bar.close()


@dataclass
class BenchReport:
    preset: str
    batch: int
    width: int
    height: int
    steps: int
    plan: str
    levers: list[str]
    load_s: float
    warmup_s: float
    first_image_after_start_s: float
    runs_s: list[float] = field(default_factory=list)
    stage_median_s: dict[str, float] = field(default_factory=dict)
    images_made: int = 0  # by the timed passes: batch x runs when every pass made its images
    # Texts encoded between the steps of the pass before theirs (encode ahead), as in the service; None: off.
    prompts_encoded_ahead: int | None = None
    # --queue N: N jobs through the service's own queue on the warm engine (jobs/queue_timing.py); None: not run.
    queue: dict[str, Any] | None = None
    peak_gpu_gib: float | None = None

    @property
    def median_s(self) -> float:
        # Kept to 0.1 ms like each run, so images_per_s is the batch over the median the report shows (the median
        # of an even count of runs is a mean, one decimal longer: images/s from it disagreed by up to 0.1 %).
        return round(statistics.median(self.runs_s), 4)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "median_s": self.median_s,
            "min_s": round(min(self.runs_s), 4),
            "max_s": round(max(self.runs_s), 4),
            "images_per_s": round(self.images_per_s, 4),
        }

    def lines(self) -> list[str]:
        spread = f"{min(self.runs_s):.3f}-{max(self.runs_s):.3f}"
        stages = ", ".join(f"{name} {seconds:.3f}s" for name, seconds in self.stage_median_s.items())
        peak = f"{self.peak_gpu_gib:.1f} GiB" if self.peak_gpu_gib is not None else "- (not a CUDA device)"
        ahead = (
            "each pass encodes its own (encode ahead is off)"
            if self.prompts_encoded_ahead is None
            else f"{self.prompts_encoded_ahead} encoded during the pass before theirs, as the service's queue does"
        )
        return [
            f"{self.preset}: {self.width}x{self.height}, {self.steps} steps, batch {self.batch}",
            f"plan: {self.plan}",
            f"levers: {', '.join(self.levers) or 'none'}",
            f"start: models {self.load_s:.1f}s, warm-up {self.warmup_s:.1f}s, "
            f"first image {self.first_image_after_start_s:.1f}s after the process started",
            f"a pass: median {self.median_s:.3f}s ({spread} over {len(self.runs_s)}), "
            f"{self.images_per_s:.3f} images/s",
            f"stages (median): {stages}; {self.images_made} images made by the timed passes",
            f"prompts: {ahead}",
            *([self._queue_line()] if self.queue else []),
            f"peak GPU memory: {peak}",
        ]

    def _queue_line(self) -> str:
        row = self.queue or {}
        steady = row.get("steady_images_per_s")
        steady_text = f", {steady:.3f} in steady state" if steady is not None else ""
        ended = "all succeeded" if row.get("all_succeeded") else "NOT ALL SUCCEEDED"
        between = row.get("between_passes_ms") or []
        claims = row.get("claim_ms") or []
        between_text = (
            f", the worker's time between passes {statistics.median(between):.1f} ms" if between else ""
        )
        if between and claims:
            between_text += f" (a claim's commit {statistics.median(claims):.1f} ms; an fsync here {row.get('fsync_ms')} ms)"
        return (
            f"through the service's queue: {row.get('jobs')} jobs in {row.get('wall_s')}s, "
            f"{row.get('images_per_s', 0):.3f} images/s{steady_text}, passes of {row.get('batch_sizes_seen')}"
            f"{between_text}, {ended}"
        )


def bench_request(preset: str, width: int, height: int, steps: int | None, image: int) -> GenerationRequest:
    """One image's request: the preset's settings, a prompt of its own (`image` numbers it)."""
    fields = dict(PRESETS[preset], prompt=f"{PROMPT}, take {image}", width=width, height=height, seed=image)
    if steps is not None:
        fields["num_inference_steps"] = steps
    return GenerationRequest(**fields)


def run_bench(
    settings: Settings,
    preset: str,
    batch: int,
    runs: int,
    requests: Callable[[int], GenerationRequest],
    progress: BenchProgress,
    queue_jobs: int = 0,
) -> BenchReport:
    """Start the engine from `settings`, warm it up as the service does, then time `runs` passes of `batch`
    images; `requests(i)` is image i's request. `progress` hears each phase (a cold compile takes minutes).
    With `queue_jobs`, that many one-image jobs then go through the service's own queue (SQLite store, worker,
    finishing thread, files) on the warm engine, at batch_max_images `batch`."""
    import torch

    from imagesmith.engine import Engine, ModelLoadError
    from imagesmith.engine.engine import BatchItem
    from imagesmith.engine.fast import warm_up_or_fall_back_to_eager
    from imagesmith.engine.tiny import TinyModelUnbuildable
    from imagesmith.sources.generate import warm_up_batches

    progress.phase("loading the models")
    began = time.perf_counter()
    try:
        engine = Engine.start(settings)
    except (ModelLoadError, RuntimeError, ValueError, TinyModelUnbuildable) as error:
        raise EngineDidNotStart(str(error)) from error
    load_s = time.perf_counter() - began
    first = requests(0).resolve()
    size = (first.width, first.height)
    # What the service warms up with these settings (batch_max_images = `batch`): both compiled graphs when
    # compiled (one-image passes and batched ones), so its cold start is what is reported.
    batches = warm_up_batches(settings)
    progress.phase(f"warming up at {size[0]}x{size[1]}, batch {' and '.join(map(str, batches))}")
    began = time.perf_counter()
    warm_up_or_fall_back_to_eager(engine, [size], batches, on_progress=progress.warm_up)
    warmup_s = time.perf_counter() - began

    numbers = iter(range(1, 1_000_000))
    cuda = engine.plan.device.startswith("cuda")
    upcoming = [requests(next(numbers)) for _ in range(batch)]

    def one_pass(another_follows: bool) -> tuple[float, list[Any]]:
        nonlocal upcoming
        current, upcoming = upcoming, [requests(next(numbers)) for _ in range(batch)]
        if engine.encode_ahead is not None:
            # As the service's worker does with its queue (IMAGESMITH_ENCODE_AHEAD): the next pass's prompts are
            # encoded between this pass's steps, so the figures are the service's, not a cold encode per pass.
            engine.encode_ahead.expect_requests(upcoming if another_follows else [])
        items = [BatchItem(request) for request in current]
        started = time.perf_counter()
        outcomes = engine.generate_batch(items)
        seconds = time.perf_counter() - started
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return seconds, outcomes

    encoded_before = engine.encode_ahead.encoded if engine.encode_ahead is not None else 0
    one_pass(another_follows=True)  # the first image after the warm-up: what a first request gets
    report = BenchReport(
        preset=preset,
        batch=batch,
        width=size[0],
        height=size[1],
        steps=first.num_inference_steps,
        plan=engine.plan.summary(),
        levers=list(engine.levers),
        load_s=round(load_s, 2),
        warmup_s=round(warmup_s, 2),
        first_image_after_start_s=round(time.monotonic() - STARTED_AT, 2),
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats(engine.plan.device)
    stages: dict[str, list[float]] = {}
    with _quiet(ENGINE_LOGGERS):  # the engine's line per stage and pass would break up the bar
        for number in range(1, runs + 1):
            seconds, outcomes = one_pass(another_follows=number < runs)
            report.runs_s.append(round(seconds, 4))
            report.images_made += sum(len(outcome.images) for outcome in outcomes)
            for stage in outcomes[0].metadata.stages:
                stages.setdefault(stage.name, []).append(stage.seconds)
            progress.timed_pass(number, runs, seconds)
    report.stage_median_s = {name: round(statistics.median(values), 4) for name, values in stages.items()}
    if engine.encode_ahead is not None:  # the timed passes' texts made ready by the pass before each
        report.prompts_encoded_ahead = engine.encode_ahead.encoded - encoded_before
    if cuda:
        report.peak_gpu_gib = round(torch.cuda.max_memory_allocated(engine.plan.device) / 2**30, 2)
    if queue_jobs:
        from imagesmith.jobs.queue_timing import request_bodies, through_queue

        progress.phase(f"{queue_jobs} jobs through the service's queue, passes of up to {batch}")
        first_job = next(numbers)  # prompts none of the passes above used: the jobs', then one warm pass's
        passes = -(-queue_jobs // batch) + 1
        with _quiet((*ENGINE_LOGGERS, *QUEUE_LOGGERS)):
            report.queue = through_queue(
                engine,
                settings,
                request_bodies(requests, first_job, queue_jobs),
                warm_bodies=request_bodies(requests, first_job + queue_jobs, batch),
                # Ten times the timed passes' pace, or five minutes: a stuck queue ends the command.
                timeout_s=max(300.0, 10 * report.median_s * passes),
            )
    return report


ENGINE_LOGGERS = ("imagesmith.engine.engine", "imagesmith.engine.pipeline")
QUEUE_LOGGERS = ("imagesmith.jobs.worker", "imagesmith.sources.generate")  # a line per job and source


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """INFO lines of these loggers held back (warnings still shown), their levels restored after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def add_bench_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time this machine with these settings (start-up, seconds a pass, images/s, peak memory)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.set_defaults(func=run_bench_command)
    parser.add_argument("--model", choices=[m.value for m in ModelPreset])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ensemble")
    parser.add_argument("--batch", type=int, help="images a pass (default: ensemble 1, mlperf 8)")
    parser.add_argument("--runs", type=int, default=5, help="timed passes after the first (default 5)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, help="override the preset's steps (ensemble 40, mlperf 20)")
    parser.add_argument(
        "--queue",
        type=int,
        default=0,
        metavar="JOBS",
        help="then send JOBS one-image jobs through the service's own queue (store, worker, files) and report its "
        "images/s (default 0: not)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_bench_command(args: argparse.Namespace) -> int:
    def error(option: str, message: str) -> int:
        print(f"imagesmith bench: error: {option}: {message}", file=sys.stderr)
        return 2

    if args.runs < 1:
        return error("--runs", f"must be at least 1, got {args.runs}")
    batch = args.batch if args.batch is not None else DEFAULT_BATCH[args.preset]
    if not 1 <= batch <= MAX_BATCH_IMAGES:  # said as --batch, not as the setting it becomes below
        return error("--batch", f"must be 1 to {MAX_BATCH_IMAGES}, got {batch}")
    if not 0 <= args.queue <= MAX_QUEUE_JOBS:  # every job's body is made first: 10**11 of them took 19 GB
        return error(
            "--queue",
            f"must be 0 (no queue row) or a number of jobs up to {MAX_QUEUE_JOBS}, got {args.queue}",
        )
    try:
        bench_request(args.preset, args.width, args.height, args.steps, 0).resolve()
    except ValidationError as invalid:
        return report_option_errors("bench", invalid, OPTION_FOR_FIELD)
    # What a service whose passes hold up to `batch` images gets: its batch_max_images.
    settings = get_settings().with_changes(batch_max_images=batch)
    if args.model:
        settings = settings.with_changes(model=args.model)
    # A data dir that cannot be made is a setting to fix (exit 2, as generate and serve say it), not an engine
    # that did not start (exit 1).
    prepared_data_dir(settings.data_dir)

    from imagesmith.engine import GenerationError

    def say(line: str) -> None:
        print(f"imagesmith bench: {line}", file=sys.stderr, flush=True)

    try:
        report = run_bench(
            settings,
            args.preset,
            batch,
            args.runs,
            lambda image: bench_request(args.preset, args.width, args.height, args.steps, image),
            BenchProgress(say),
            queue_jobs=args.queue,
        )
    except EngineDidNotStart as failure:
        print(f"imagesmith bench: cannot start the engine: {failure}", file=sys.stderr)
        return 1
    except (GenerationError, TimeoutError) as failure:
        print(f"imagesmith bench: {failure}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print("\n".join(report.lines()))
    if report.queue is not None and not report.queue["all_succeeded"]:
        print(
            "imagesmith bench: some of the queue row's jobs failed (see the service's log lines)",
            file=sys.stderr,
        )
        return 1
    return 0
