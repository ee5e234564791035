"""imagesmith's command line: generate | doctor | bench (and serve | search | prune where those parts are installed).

Bad input exits with status 2 and a message naming the option; failures exit 1 with one clear line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from imagesmith import __version__, exit_guard
from imagesmith.bench import add_bench_parser
from imagesmith.config import (
    ENV_PREFIX,
    ModelPreset,
    Settings,
    UnusableSetting,
    env_file_problem,
    get_settings,
    prepared_data_dir,
    settings_error_lines,
    unknown_setting_lines,
)
from imagesmith.option_errors import USAGE_ERROR, report_option_errors
from imagesmith.output_file import (
    STDOUT,
    STDOUT_NAMES,
    OutputPathError,
    check_writable,
    is_special_file,
    output_option,
    planned_output,
    stdout_format,
    write_stdout,
    write_whole,
)
from imagesmith.schemas import (
    MAX_NUM_IMAGES,
    AspectPreset,
    GenerationRequest,
    OutputFormat,
    RefineMode,
    SchedulerName,
)
from imagesmith.stdout_guard import StdoutUnwritable, guarded_stdout, silence_stdout

log = logging.getLogger("imagesmith")

# CLI option for each request field, so errors name what the user typed.
_OPTION_FOR_FIELD = {
    "prompt": "PROMPT",  # the positional argument: there is no --prompt
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "refine_mode": "--mode",
    "negative_prompt": "--negative",
    "output_format": "--format",
    "num_images": "--num-images",
    "high_noise_frac": "--high-noise-frac",
    "refine_steps": "--refine-steps",
    "refine_strength": "--refine-strength",
}


def _add_generate(subparsers: Any) -> None:
    parser = subparsers.add_parser("generate", help="generate image(s) from a prompt")
    parser.set_defaults(func=run_generate)
    parser.add_argument("prompt")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="file to write (default image.png, or image.<format> with --format); with several images, "
        "NAME_0.png, NAME_1.png, ...; '-' writes the one image to standard output (PNG unless --format)",
    )
    parser.add_argument(
        "--model",
        choices=[m.value for m in ModelPreset],
        help="'tiny' runs the built-in noise model (tests, demo); default from settings",
    )
    parser.add_argument("--negative", default="")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--aspect", choices=[a.value for a in AspectPreset])
    parser.add_argument("--steps", type=int, help="total denoising steps (default 40; 30 with --draft)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--mode", choices=[m.value for m in RefineMode], help="refinement (default ensemble)")
    parser.add_argument(
        "--high-noise-frac", type=float, help="ensemble: share of the steps the base runs (default 0.8)"
    )
    parser.add_argument(
        "--refine-steps", type=int, help="img2img mode: refiner steps before strength (default 30)"
    )
    parser.add_argument(
        "--refine-strength", type=float, help="img2img mode: how much to re-noise (default 0.3)"
    )
    parser.add_argument("--scheduler", choices=[s.value for s in SchedulerName], default="euler")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--num-images",
        type=int,
        default=1,
        help=f"images to make, 1 to {MAX_NUM_IMAGES}, one pass (image i uses seed + i)",
    )
    parser.add_argument(
        "--format",
        choices=[f.value for f in OutputFormat],
        help="default: from the output file's extension, else png",
    )
    parser.add_argument("--draft", action="store_true", help="high_quality=false: 30 steps, no refiner")
    parser.add_argument("--no-refine", action="store_true", help="use_refinement=false: base only")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the full metadata as JSON, with the files written ('files')",
    )


def _add_doctor(subparsers: Any) -> None:
    parser = subparsers.add_parser("doctor", help="show the device, the hardware plan and the models")
    parser.set_defaults(func=run_doctor)
    parser.add_argument("--model", choices=[m.value for m in ModelPreset])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagesmith", description="Featured images: SDXL generation and stock."
    )
    parser.add_argument("--version", action="version", version=f"imagesmith {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_doctor(subparsers)
    add_bench_parser(subparsers)
    for module, adder in (
        ("imagesmith.api.serve", "add_serve_parser"),
        ("imagesmith.sources.cli_search", "add_search_parser"),
        ("imagesmith.jobs.prune_cli", "add_prune_parser"),
    ):
        _add_optional(subparsers, module, adder)
    return parser


def _add_optional(subparsers: Any, module: str, adder: str) -> None:
    """Commands of optional parts (the HTTP server, stock search) register themselves when importable."""
    import importlib

    with contextlib.suppress(ModuleNotFoundError):
        getattr(importlib.import_module(module), adder)(subparsers)


def _settings_for(args: argparse.Namespace) -> Settings:
    settings = get_settings()
    if getattr(args, "model", None):
        settings = settings.with_changes(model=args.model)
    return settings


def _request_from(args: argparse.Namespace, output_format: OutputFormat) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "width": args.width,
        "height": args.height,
        "aspect": args.aspect,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "refine_mode": args.mode,
        "high_noise_frac": args.high_noise_frac,
        "refine_steps": args.refine_steps,
        "refine_strength": args.refine_strength,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "num_images": args.num_images,
        "output_format": output_format,
        "high_quality": not args.draft,
        "use_refinement": not args.no_refine,
    }
    return GenerationRequest(**{key: value for key, value in fields.items() if value is not None})


# The options that shape one refinement mode only, by the mode they belong to.
_MODE_OPTIONS = {
    "--high-noise-frac": ("high_noise_frac", RefineMode.ENSEMBLE),
    "--refine-steps": ("refine_steps", RefineMode.IMG2IMG),
    "--refine-strength": ("refine_strength", RefineMode.IMG2IMG),
}


def unused_options(args: argparse.Namespace, mode: RefineMode) -> list[str]:
    """A note for each option given that this run's refinement mode does not use (they were ignored without
    a word: --refine-steps with the default ensemble, say)."""
    return [
        f"{option} applies to --mode {wanted.value}; this run is {mode.value}, so it is not used"
        for option, (attribute, wanted) in _MODE_OPTIONS.items()
        if getattr(args, attribute) is not None and mode is not wanted
    ]


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{index}{output.suffix}") for index in range(count)]


class _StageBars:
    """One tqdm bar per stage, on stderr, so stdout stays clean for --json."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._stage = ""
        self._last_event_s = 0.0  # the latest event's elapsed_s: where the next stage begins

    def __call__(self, event: Any) -> None:
        if event.stage != self._stage or self._bar is None:
            self.close()
            self._stage = event.stage
            from tqdm import tqdm  # imported with the first bar, not on every step

            from imagesmith.engine.progress import DECODE_STAGE

            self._bar = tqdm(
                total=event.total,
                desc=f"{event.stage:>11}",
                unit="pass" if event.stage == DECODE_STAGE else "step",  # the decode is one pass, no steps
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )
            # A denoising stage is first heard when its first step is done: the bar's clock starts where the
            # stage began, the last event before it, or a one-step stage showed 00:00 and 14,000 steps/s.
            self._bar.start_t -= max(0.0, event.elapsed_s - self._last_event_s)
        self._last_event_s = event.elapsed_s
        self._bar.update(event.step - self._bar.n)
        if event.step >= event.total:
            # The stage is done: its bar stops its clock here. Left open, the last stage's bar went on counting
            # through the decode (72 s shown for a 28 s stage, on the CPU).
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def run_generate(args: argparse.Namespace) -> int:
    # The option as typed: Path would make './-' (a file named '-') into '-' (standard output).
    # '-', or /dev/stdout and its kin: the same bytes, the same checks.
    to_stdout = args.output in STDOUT_NAMES
    try:  # before the models load: a path that cannot be written costs no generation
        if to_stdout:
            output, output_format = STDOUT, stdout_format(args.format, args.num_images, args.json)
        else:
            output, output_format = planned_output(
                output_option(args.output, "image"), args.format, OutputFormat.PNG, " (or give --format)"
            )
            if is_special_file(output) and args.num_images != 1:
                raise OutputPathError(
                    f"{output} is a device or a pipe, not a file, and takes one image, not --num-images "
                    f"{args.num_images}; name a file (-o hero.png writes hero_0.png, hero_1.png, ...)"
                )
            # With --num-images, each image's own name (m_1.png) too; a count out of range is refused below.
            for path in output_paths(
                output, args.num_images if 1 <= args.num_images <= MAX_NUM_IMAGES else 1
            ):
                check_writable(path)
    except OutputPathError as error:
        print(f"imagesmith generate: error: --output: {error}", file=sys.stderr)
        return USAGE_ERROR
    if args.no_refine and args.mode in (RefineMode.ENSEMBLE, RefineMode.IMG2IMG):
        print(
            f"imagesmith generate: error: --no-refine: conflicts with --mode {args.mode}; drop one",
            file=sys.stderr,
        )
        return USAGE_ERROR
    try:
        request = _request_from(args, output_format)
    except ValidationError as error:
        return report_option_errors("generate", error, _OPTION_FOR_FIELD)
    for option in unused_options(args, request.resolve().refine_mode):
        print(f"imagesmith generate: note: {option}", file=sys.stderr)
    from imagesmith.engine import Engine, GenerationError, ModelLoadError
    from imagesmith.engine.output import encode_in_parallel
    from imagesmith.engine.tiny import TinyModelUnbuildable

    settings = _settings_for(args)
    try:
        problem = _empty_stage_before_loading(settings, request)
    except TinyModelUnbuildable as error:
        print(f"imagesmith generate: {error}", file=sys.stderr)
        return 1
    if problem is not None:
        print(f"imagesmith generate: error: {problem}", file=sys.stderr)
        return USAGE_ERROR
    try:
        engine = Engine.start(settings)
    except UnusableSetting:
        raise  # said by _run, as a setting
    except (ModelLoadError, RuntimeError, ValueError) as error:
        print(f"imagesmith generate: cannot start the engine: {error}", file=sys.stderr)
        return 1
    bars = _StageBars()
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        # A log line (the decode's "stage decode ...", logged while its bar is open) above the bars, not in one.
        with logging_redirect_tqdm():
            result = engine.generate(request, on_progress=bars)
    except GenerationError as error:
        print(f"imagesmith generate: {error}", file=sys.stderr)
        return 1
    finally:
        bars.close()
    paths = output_paths(output, len(result.images))
    encoded = encode_in_parallel([functools.partial(result.encoded, index) for index in range(len(paths))])
    for index, (path, data) in enumerate(zip(paths, encoded, strict=True)):
        try:
            write_stdout(data) if to_stdout else write_whole(path, data)
        except OSError as error:  # checked writable before; since then the disk filled or the folder went
            where = "standard output" if to_stdout else path
            print(f"imagesmith generate: cannot write {where}: {error.strerror or error}", file=sys.stderr)
            # The images before it are whole files: say so, so they are neither lost nor trusted blind.
            if index:
                written = ", ".join(str(done) for done in paths[:index])
                print(
                    f"imagesmith generate: {index} of {len(paths)} images written: {written}", file=sys.stderr
                )
            return 1
    meta = result.metadata
    if args.json:
        # The files too: the CLI names them itself (-o hero gives hero.png; several images hero_0.png, ...), and
        # --json drops the "wrote" lines that said so.
        print(json.dumps({**meta.model_dump(mode="json"), "files": [str(path) for path in paths]}, indent=2))
    else:
        # With -o - the image is stdout's only content: the summary goes to stderr, beside the bars.
        report = sys.stderr if to_stdout else sys.stdout
        stages = ", ".join(map(str, meta.stages))
        refined = "refined" if meta.refined else f"not refined ({meta.not_refined_reason})"
        for path, seed in zip(paths, meta.seeds, strict=True):
            print(f"wrote {'standard output' if to_stdout else path} (seed {seed})", file=report)
        print(
            f"{meta.request.width}x{meta.request.height}, {refined}; {stages}; total {meta.total_seconds:.2f}s "
            f"on {meta.device} {meta.dtype}",
            file=report,
        )
    return 0


def _empty_stage_before_loading(settings: Settings, request: GenerationRequest) -> str | None:
    """An ensemble split that leaves the base or the refiner no step with the model's own scheduler, said with
    the options' names before the models load. The request's own check counts int(steps x split); the scheduler's
    timesteps decide (DPM++ and UniPC put other counts above the cut), and that check came only after the load,
    as exit 1 with the library's field names. Skipped when the scheduler's config is not on disk yet (a model
    still to download): the engine's check then says it. Builds the tiny model if it is missing, as the load
    would (TinyModelUnbuildable when it cannot)."""
    from imagesmith.engine.models import resolve_sources
    from imagesmith.engine.pipeline import empty_stage_problem
    from imagesmith.engine.schedulers import scheduler_config_on_disk

    config = scheduler_config_on_disk(resolve_sources(settings).base)
    return None if config is None else empty_stage_problem(request.resolve(), config, _OPTION_FOR_FIELD)


def _check_tiny_models(settings: Settings, plan: Any) -> int:
    """doctor's line for the built-in tiny model, loaded (seconds), not only looked for: a folder damaged since
    it was built (a file deleted, a disk error) passed doctor and failed the first generation. Built here if
    missing, as any command would. Returns the problems found (0 or 1)."""
    from imagesmith.engine.models import ModelLoadError, load_models
    from imagesmith.engine.tiny import TinyModelUnbuildable

    where = settings.tiny_model_dir()
    try:
        loaded = load_models(settings, plan)
    except (ModelLoadError, TinyModelUnbuildable) as error:
        print(f"models: tiny at {where}: ERROR {error}")
        return 1
    if loaded.refiner is None:  # the engine would serve base-only; a damaged tiny model is worth fixing
        print(f"models: tiny at {where}: ERROR {loaded.refiner_error}")
        return 1
    print(f"models: tiny (built-in, random weights) at {where}: base and refiner load")
    return 0


def _check_fa4_attention(device: str) -> int:
    """doctor's line for IMAGESMITH_ATTENTION_BACKEND=fa4: its kernel run once on the device, as a start does
    (which refuses to start where it fails). 1 where it fails."""
    from imagesmith.engine.fa4_attention import start_problem

    problem = start_problem(device)
    if problem is None:
        print(f"attention: FlashAttention-4 for the UNets' attention: ok (its kernel ran on {device})")
        return 0
    print(f"attention: ERROR {problem}")
    return 1


def run_doctor(args: argparse.Namespace) -> int:
    import torch

    from imagesmith.engine.hardware import plan_hardware, probe_device
    from imagesmith.engine.models import describe_source, offline

    settings = _settings_for(args)
    print(f"imagesmith {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    problems = 0
    # A device or a plan this machine cannot serve is one problem among others: the data dir, the models and
    # Pexels are still checked (doctor stopped at the device line, so a machine without its GPU showed one
    # problem, and the next fix came only after that one).
    plan = None
    try:
        device = probe_device(settings.device)
    except (RuntimeError, ValueError) as error:
        print(f"device: ERROR {error}")
        problems += 1
    else:
        memory = (
            f", {device.free_memory_gib:.1f}/{device.total_memory_gib:.1f} GiB free"
            if device.kind == "cuda"
            else ""
        )
        capability = (
            f", compute capability {device.capability[0]}.{device.capability[1]}" if device.capability else ""
        )
        print(f"device: {device.torch_device} ({device.name}{capability}{memory})")
        try:
            plan = plan_hardware(device, settings)
        except RuntimeError as error:  # settings this device cannot serve, such as fp8 on a card without it
            print(f"plan: ERROR {error}")
            problems += 1
        else:
            print(f"plan: {plan.summary()}")
            from imagesmith.engine.speed_advice import speed_lines

            for line in speed_lines(settings, device, plan):
                print(line)
            if plan.attention == "fa4":
                problems += _check_fa4_attention(plan.device)
    hub_mode = "offline (local files only)" if offline(settings) else "downloads allowed"
    print(f"hub: {hub_mode}; data dir {settings.data_dir}")
    data_dir_usable = True
    try:
        prepared_data_dir(settings.data_dir)  # made as every other command would make it
    except UnusableSetting as error:
        print(f"data dir: {error}")
        problems += 1
        data_dir_usable = False
    if settings.model is ModelPreset.TINY and not data_dir_usable:  # it lives in the data dir
        print(f"models: tiny at {settings.tiny_model_dir()}: not checked (the data dir above cannot be used)")
    elif settings.model is ModelPreset.TINY and plan is None:  # loading it needs a device and a plan
        print(f"models: tiny at {settings.tiny_model_dir()}: not checked (no plan for the device above)")
    elif settings.model is ModelPreset.TINY:
        problems += _check_tiny_models(settings, plan)
    else:
        checks = [("base model", "base_model", "model_index.json")]
        if settings.refiner_model:
            checks.append(("refiner", "refiner_model", "model_index.json"))
        else:
            print("refiner: none configured (base-only generation)")
        if settings.vae_model:
            checks.append(("vae", "vae_model", "config.json"))  # a lone AutoencoderKL folder
        for label, field, index_file in checks:
            source = getattr(settings, field)
            check = describe_source(source, settings, ENV_PREFIX + field.upper(), index_file)
            print(f"{label}: {source}: {check.text}")
            problems += check.will_fail
    from imagesmith.sources.cli_search import pexels_doctor

    pexels = pexels_doctor(settings, online=True)  # the same settings as the lines above
    for line in pexels.lines:
        print(line)
    problems += pexels.fault  # not configured (optional), the network or a spent quota: not a fault
    if problems:
        print(f"doctor: {problems} problem(s) above will stop imagesmith working as configured")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    code = _main_guarded(argv)
    exit_guard.set_exit_code(code)  # the code, should the exit have to skip the interpreter's shutdown
    return code


def _main_guarded(argv: list[str] | None) -> int:
    unreadable = env_file_problem()
    if unreadable is not None:
        print(f"imagesmith: error: {unreadable}", file=sys.stderr)
        return 2
    for line in unknown_setting_lines():
        print(f"imagesmith: warning: {line}", file=sys.stderr)
    interrupted = _InterruptWatch()
    try:
        with guarded_stdout():
            return _run(argv)
    except StdoutUnwritable as failed:
        print(f"imagesmith: cannot write standard output: {failed}", file=sys.stderr)
        silence_stdout()
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the engine has stopped its pass by now (gpu_thread.py)
        print("imagesmith: interrupted", file=sys.stderr)
        return 130
    except Exception:
        if not interrupted.seen:
            raise
        # A Ctrl-C that a library turned into its own error: pressed while torch, diffusers and accelerate are
        # imported (seconds, at every start), it left accelerate half-imported and came out as diffusers'
        # RuntimeError "Failed to import ..." with two tracebacks. Kept for -v, in case it was not that.
        logging.getLogger(__name__).debug("error after Ctrl-C", exc_info=True)
        print("imagesmith: interrupted", file=sys.stderr)
        return 130
    finally:
        interrupted.restore()


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)  # imports the optional commands' modules: seconds, interruptible
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not args.verbose:
        # diffusers and transformers talk a lot at INFO; keep our own lines readable.
        for noisy in ("diffusers", "transformers", "httpx", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))  # each subparser, optional ones too, sets its func
    except ValidationError as error:
        if error.title != Settings.__name__:  # a request's fields are reported by the command itself
            raise
        for line in settings_error_lines(error):
            print(f"imagesmith: error: {line}", file=sys.stderr)
        return 2
    except UnusableSetting as error:
        print(f"imagesmith: error: {error}", file=sys.stderr)
        return 2


class _InterruptWatch:
    """Notes a Ctrl-C (SIGINT) and raises KeyboardInterrupt as Python's own handler does. Installed only over
    that handler, on the main thread: a job started with SIGINT ignored stays so."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None
        on_main_thread = threading.current_thread() is threading.main_thread()
        if on_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.seen = True
        signal.default_int_handler(signum, frame)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


if __name__ == "__main__":
    raise SystemExit(main())
