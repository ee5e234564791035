"""Images per second through the service's queue (SQLite job store -> worker -> engine -> content-addressed
files), at batch_max_images 1, 4 and 8, on full-size random-weight SDXL at the MLPerf setting (20 steps, base
only, guidance 8, 1024x1024). Optionally the same with the compiled engine.

Each configuration queues N jobs at once, starts a worker and times until the last job finishes. The worker
batches compatible queued jobs (engine batch_key) up to batch_max_images per pipeline pass.

With --ab each compiled batch size also runs with the pass's encoding done inline (finish_in_background off:
the worker as it was before jobs/finishing.py) and with previews off, on the same warm engine, so the two levers
are measured against the default in one run (--ab-rounds 2 or more repeats them, in alternating order, to tell an
effect of a few % from the spread between rows). Each row reports the median stage times of its jobs' passes, to
compare with the engine alone (fast_path.py).

`--repeats N` runs N rows of the default per compiled batch size, then the engine alone; `--encode-ahead-ab` and
`--encoder-graphs-ab` add, to each repeat after the first, a row with encode ahead off (on by default) and one
with the text encoders' CUDA graphs paused (eager encoders), in alternating order.

Every row sends prompts of its own (`--repeat-prompts`: the same in every row), so no row finds its embeddings in
the engine's prompt cache: what a stream of new requests gets. Each row's probe also times the base UNet's and
both text encoders' calls (unet_timeline.py).

Usage:  PYTHONPATH=src python benchmarks/queue_throughput.py --out DIR [--jobs 16] [--compiled] [--ab] [--smoke]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from row_probe import RowProbe
from sdxl_random import architecture, build_components, build_pipelines
from unet_timeline import UnetTimeline

from imagesmith.jobs.queue_timing import generation_worker, steady_state


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "queue-out"))
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--compiled", action="store_true", help="also run the largest batch compiled")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--fp8", action="store_true", help="the compiled run with fp8 UNet linears")
    parser.add_argument(
        "--fp8-scales",
        default="static",
        choices=["static", "dynamic"],
        help="with --fp8: IMAGESMITH_FP8_SCALES",
    )
    parser.add_argument("--cache-dir", default="", help="inductor cache (default OUT/data/compile-cache)")
    parser.add_argument(
        "--all-compiled", action="store_true", help="every batch size compiled, not the largest"
    )
    parser.add_argument(
        "--eager-batches",
        default=None,
        help="batch sizes run eager (default: --batches; 'none': no eager rows)",
    )
    parser.add_argument(
        "--ab", action="store_true", help="compiled rows also with inline finishing and with previews off"
    )
    parser.add_argument(
        "--ab-rounds", type=int, default=1, help="with --ab: rounds of the variants, in alternating order"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="without --ab: compiled rows of the default configuration per batch size; with 2 or more, the engine "
        "alone once after them (the first row after a warm-up has been up to 9 %% slower than later ones)",
    )
    parser.add_argument(
        "--repeat-prompts",
        action="store_true",
        help="every row sends the same prompts (later rows then hit the engine's prompt cache), as runs 27-40 did",
    )
    parser.add_argument(
        "--encode-ahead-ab",
        action="store_true",
        help="with --repeats: each repeat also runs a row with IMAGESMITH_ENCODE_AHEAD off (engine/encode_ahead.py; "
        "on by default since run 41, whose rows named encode-ahead had it on against a default without)",
    )
    parser.add_argument(
        "--encoder-graphs-ab",
        action="store_true",
        help="with --repeats: each repeat also runs a row with the text encoders eager, their CUDA graphs "
        "(IMAGESMITH_TEXT_ENCODER_GRAPHS, on by default with the CUDA-graph modes) paused",
    )
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    # The service's own log lines (each warm-up pass, each fp8 plan chosen, "ready after"), timestamped: run 55's
    # start ran 460 s and was cut off at the deadline without a line saying where it was.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(relativeCreated)9.0f ms] %(name)s: %(message)s"))
    for name in ("imagesmith.engine.fast", "imagesmith.engine.cudnn_graphs", "imagesmith.sources.generate"):
        start_up_log = logging.getLogger(name)  # the start-up's lines, not every job's
        start_up_log.addHandler(handler)
        start_up_log.setLevel(logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from imagesmith.config import Settings
    from imagesmith.engine.encoder_graphs import installed, text_encoders
    from imagesmith.engine.engine import BatchItem, Engine, encode_ahead_for
    from imagesmith.engine.hardware import plan_hardware, probe_device
    from imagesmith.engine.models import LoadedModels, ModelSources
    from imagesmith.jobs.store import JobStatus, JobStore
    from imagesmith.schemas import GenerationRequest
    from imagesmith.sources.base import ImageRequest, SourceName

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    px, steps = (64, 3) if args.smoke else (1024, 20)
    plan = plan_hardware(probe_device(device), Settings())
    components = build_components(architecture("smoke" if args.smoke else "full"), device)
    components.to(plan.dtype, plan.vae_dtype)
    base, refiner = build_pipelines(components)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    engine = Engine(LoadedModels(base, refiner, None, ModelSources("random-full", "random-full", None)), plan)
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "jobs": args.jobs,
        "rows": [],
    }

    rows_begun = [0]  # rows so far: each row's prompts are its own unless --repeat-prompts

    def request(seed: int) -> dict[str, Any]:
        # New prompts in every row, as real traffic (and MLPerf's captions) has: until run 40 every row repeated
        # the first row's prompts, so later rows found their embeddings in the engine's prompt cache and skipped
        # the text encoders (~45 ms a job at batch 1), and "the slow first row" was the only honest one.
        row = 0 if args.repeat_prompts else rows_begun[0]
        generation = GenerationRequest(
            prompt=f"a lighthouse, take {seed}, row {row}",
            width=px,
            height=px,
            num_inference_steps=steps,
            guidance_scale=8.0,
            refine_mode="none",
            seed=seed,
        )
        return ImageRequest(sources=[SourceName.GENERATE], generation=generation).model_dump(mode="json")

    # Set once the UNets are compiled: the base UNet's call timeline (unet_timeline.py), taken per row, and the
    # text encoders' (eager, so launch-bound: run 40 put a slow row's lost time at the jobs' boundaries, where
    # they run).
    timeline: UnetTimeline | None = None
    encoder_timelines: dict[str, UnetTimeline] = {}

    def timeline_taken() -> dict[str, Any]:
        taken = timeline.take() if timeline is not None else {}
        for name, encoder in encoder_timelines.items():
            calls = encoder.take()
            for key in ("unet_calls", "unet_gpu_ms_median", "host_call_ms_median_max"):
                if key in calls:
                    taken[f"{name}.{key.removeprefix('unet_')}"] = calls[key]
        return taken

    def medians(times: dict[str, list[float]]) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in times.items()}

    def record(row: dict[str, Any], line: str) -> None:
        """A row into the results (rewritten after each, so a run cut short keeps what it measured) and a line."""
        results["rows"].append(row)
        print(line, flush=True)
        (out / "queue_throughput.json").write_text(json.dumps(results, indent=1))

    def through_queue(
        batch: int, label: str, levers: Settings | None = None, changes: dict[str, Any] | None = None
    ) -> None:
        with tempfile.TemporaryDirectory() as folder:
            data = Path(folder)
            settings = Settings(data_dir=data, batch_max_images=batch, batch_window_ms=0, **(changes or {}))
            if levers is not None:
                # The service's own start-up: warm-up (compilation) at batch 1 and batch_max_images, timed.
                settings = levers.with_changes(data_dir=data, batch_max_images=batch, batch_window_ms=0)
                settings = settings.with_changes(warmup_sizes=f"{px}x{px}", **(changes or {}))
            store = JobStore(data / "jobs.sqlite3")
            # What Engine.start does with IMAGESMITH_ENCODE_AHEAD (this engine is built directly).
            engine.encode_ahead = encode_ahead_for(engine, settings)
            # The encoders' graphs were installed once, with the levers; a row that turns them off pauses them.
            graphs = [graph for graph in map(installed, text_encoders(base, refiner)) if graph]
            for graph in graphs:
                graph.paused = settings.text_encoder_graphs is False
            replays_before = sum(graph.replays for graph in graphs)
            # Loading the generation source runs the service's warm-up, when its settings ask for one.
            worker = generation_worker(engine, settings, store, data / "images")
            startup = dict(engine.startup) if levers is not None else None
            rows_begun[0] += 1
            # One warm pass at this batch size (compiles it when compiled), outside the timing.
            warm = [store.submit(request(10_000 + i), f"w{i}", None, 1000)[0].id for i in range(batch)]
            ids = []
            worker.start()
            while not all(store.get(i).status.terminal for i in warm):  # type: ignore[union-attr]
                time.sleep(0.01)
            timeline_taken()  # the warm-up's calls are not the row's
            with RowProbe() as probe:
                started_wall = time.time()  # the store's finished_at clock
                started = time.perf_counter()
                for seed in range(args.jobs):
                    body = request(seed)
                    ids.append(
                        store.submit(body, hashlib.sha256(repr(body).encode()).hexdigest(), None, 1000)[0].id
                    )
                worker.notify()
                while not all(store.get(i).status.terminal for i in ids):  # type: ignore[union-attr]
                    time.sleep(0.01)
                wall = time.perf_counter() - started
            worker.stop()
            for graph in graphs:
                graph.paused = False  # the next row (the engine alone, the next arm) decides for itself
            statuses = {store.get(i).status for i in ids}  # type: ignore[union-attr]
            finished = sorted(store.get(i).finished_at - started_wall for i in ids)  # type: ignore[union-attr,operator]
            sizes = sorted({store.get(i).result["metadata"]["batch_size"] for i in ids})  # type: ignore[index,union-attr]
            stage_times: dict[str, list[float]] = {}
            for job_id in ids:
                result = store.get(job_id).result or {}  # type: ignore[union-attr]
                for stage in result.get("metadata", {}).get("stages", []):
                    stage_times.setdefault(stage["name"], []).append(stage["seconds"])
            store.close()
        row = {
            "config": label,
            "batch_max_images": batch,
            "wall_s": wall,
            "images_per_s": args.jobs / wall,
            # From the end of the first pass to the end of the last (imagesmith/jobs/queue_timing.py): without the first pass's
            # encodes and the last pass's files, which a 2-pass row mixes in.
            **steady_state(finished, batch),
            "batch_sizes_seen": sizes,
            "all_succeeded": statuses == {JobStatus.SUCCEEDED},
            "startup": startup,
            "changes": changes or {},
            # One value per job: a batched pass's stages appear once for each of its jobs.
            "median_stage_s": medians(stage_times),
            # Each job's base stage in the order queued (and run): a slow row that is slow from its first job to
            # its last is a different cause from one that speeds up as it goes.
            "base_s_by_job": [round(seconds, 4) for seconds in stage_times.get("base", [])],
            "probe": probe.summary() | timeline_taken(),
            # Texts encoded in an earlier pass's step callbacks (engine/encode_ahead.py), with encode ahead on.
            "encoded_ahead": engine.encode_ahead.encoded if engine.encode_ahead is not None else 0,
            # Text-encoder calls replayed as CUDA graphs in this row, its warm pass included (encoder_graphs.py).
            "encoder_graph_replays": sum(graph.replays for graph in graphs) - replays_before,
            "encoder_graph_failures": [graph.failure for graph in graphs if graph.failure],
        }
        record(
            row,
            f"{label:10s} batch {batch}: {row['images_per_s']:.2f} images/s ({wall:.1f}s for {args.jobs}; "
            f"steady state {row.get('steady_images_per_s', float('nan')):.2f}) "
            f"batches {sizes} ok={row['all_succeeded']} stages {row['median_stage_s']} startup {startup} "
            f"probe {row['probe']}",
        )

    def engine_alone(batch: int, label: str, runs: int = 5) -> None:
        """The peer of the queue's rows: the same passes through Engine.generate_batch, with no worker, store,
        progress tracker or files, on the same warm engine."""
        walls: list[float] = []
        stage_times: dict[str, list[float]] = {}
        rows_begun[0] += 1
        engine.encode_ahead = None  # no worker, no queue to look ahead at
        timeline_taken()
        with RowProbe() as probe:
            for run in range(runs):
                items = [
                    BatchItem(GenerationRequest.model_validate(request(20_000 + 8 * run + i)["generation"]))
                    for i in range(batch)
                ]
                began = time.perf_counter()
                outcomes = engine.generate_batch(items)
                walls.append(time.perf_counter() - began)
                first = outcomes[0]
                assert not isinstance(first, BaseException), first
                for stage in first.metadata.stages:
                    stage_times.setdefault(stage.name, []).append(stage.seconds)
        row = {
            "config": f"{label},engine-alone",
            "batch_max_images": batch,
            "images_per_s": batch / statistics.median(walls),
            "median_wall_s": statistics.median(walls),
            "median_stage_s": medians(stage_times),
            "probe": probe.summary() | timeline_taken(),
        }
        record(
            row,
            f"{row['config']:10s} batch {batch}: {row['images_per_s']:.2f} images/s (median pass "
            f"{row['median_wall_s']:.3f}s) stages {row['median_stage_s']} probe {row['probe']}",
        )

    batches = [int(b) for b in args.batches.split(",")]
    eager_batches = args.eager_batches if args.eager_batches is not None else args.batches
    for batch in [] if eager_batches == "none" else [int(b) for b in eager_batches.split(",")]:
        through_queue(batch, "eager")
    if args.compiled:
        cache = Path(args.cache_dir) if args.cache_dir else out / "data" / "compile-cache"
        levers = Settings(
            data_dir=out / "data",
            compile=args.compile_mode,
            fp8=args.fp8,
            fp8_scales=args.fp8_scales,
            warmup_sizes=f"{px}x{px}",  # where static fp8 scales are calibrated
            compile_cache_dir=cache,
        )
        # The plan decides fp8, so the levers get a plan made from their own settings.
        levers_plan = plan_hardware(probe_device(device), levers)
        results["levers"] = engine.apply_levers(levers, levers_plan)  # as Engine.start applies them
        if base.unet._compiled_call_impl is not None:
            timeline = UnetTimeline(base.unet)
            encoder_timelines.update(
                text_encoder=UnetTimeline(base.text_encoder), text_encoder_2=UnetTimeline(base.text_encoder_2)
            )
        label = args.compile_mode + (
            ("+fp8" if args.fp8_scales == "static" else "+fp8dyn") if args.fp8 else ""
        )
        variants: list[tuple[str, dict[str, Any]]] = [(label, {})]
        if args.ab:
            variants += [
                (f"{label},inline-finish", {"finish_in_background": False}),
                (f"{label},no-preview", {"preview_every": 0}),
            ]
        for batch in batches if args.all_compiled else batches[-1:]:
            through_queue(batch, label, levers)  # the first row at this size also warms it up (compiles)
            # The same warm engine: these rows' warm-ups reuse the graphs compiled above. Each round runs the
            # variants in turn, the next round in reverse, so a drift over the rows hits every variant alike.
            for round_ in range(args.ab_rounds if args.ab else 0):
                order = variants if round_ % 2 else variants[::-1]
                for name, changes in order:
                    if round_ or changes:  # round 0 has the default already, from the warm-up row
                        through_queue(batch, name, levers, changes)
                engine_alone(batch, label)
            if not args.ab and args.repeats > 1:
                repeated: list[tuple[str, dict[str, Any]]] = [(label, {})]
                if args.encode_ahead_ab:
                    repeated.append((f"{label},no-encode-ahead", {"encode_ahead": False}))
                if args.encoder_graphs_ab:
                    repeated.append((f"{label},eager-encoders", {"text_encoder_graphs": False}))
                for repeat in range(args.repeats - 1):
                    order = repeated if repeat % 2 == 0 else repeated[::-1]  # alternating, as --ab's rounds
                    for name, changes in order:
                        through_queue(batch, name, levers, changes)
                engine_alone(batch, label)


if __name__ == "__main__":
    main()
