"""Same-process A/Bs of the engine's exact host-side changes: each peer undoes one change on the warm engine for
the length of a `with` block, and `alternating_ab` times peer and engine batches in turn.

Why alternating: at batch 8 the H200 runs at its power limit and its clock moves, so a batch's time spreads by
±1 % (3.99-4.08 s in run 67). Runs 66-68 timed 3 peer batches and then 3 engine batches: a drift over those
seconds fell on one side, and a host change worth 10-20 ms could not be told from it (run 68: -7 ± 20 ms).
Taking them in turn puts the drift on both sides; the median of each side's batches is compared.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

Peer = Callable[[], AbstractContextManager[object]]


@contextmanager
def searched_execution_device(engine: Any) -> Iterator[None]:
    """diffusers' search for the pipelines' and text encoders' execution device, on every use (run 66's peer
    of engine/execution_device.py)."""
    from imagesmith.engine.execution_device import pin_execution_device, unpin_execution_device

    pipes = [pipe for pipe in (engine.models.base, engine.models.refiner) if pipe is not None]
    devices = [pipe._execution_device for pipe in pipes]
    for pipe in pipes:
        unpin_execution_device(pipe)
    try:
        yield
    finally:
        for pipe, device in zip(pipes, devices, strict=True):
            pin_execution_device(pipe, device)


@contextmanager
def searched_text_encoders(engine: Any) -> Iterator[None]:
    """Only the text encoders' device searched (`encode_prompt`'s `get_module_execution_device`); the pipelines
    stay pinned (run 68's peer, with diffusers' noise)."""
    from imagesmith.engine.execution_device import _DEVICE_ATTRIBUTE

    encoders = {
        id(module): module
        for pipe in (engine.models.base, engine.models.refiner)
        if pipe is not None
        for module in (pipe.text_encoder, pipe.text_encoder_2)
        if module is not None
    }
    pinned = {key: module.__dict__.pop(_DEVICE_ATTRIBUTE, None) for key, module in encoders.items()}
    try:
        yield
    finally:
        for key, device in pinned.items():
            if device is not None:
                encoders[key].__dict__[_DEVICE_ATTRIBUTE] = device


@contextmanager
def diffusers_noise(engine: Any) -> Iterator[None]:
    """diffusers' own starting noise: drawn on the pass's thread, a CPU cat, a blocking upload."""
    noise, engine.starting_noise = engine.starting_noise, None
    try:
        yield
    finally:
        engine.starting_noise = noise


@contextmanager
def fresh_pixel_memory(engine: Any) -> Iterator[None]:
    """The decoded pixels into a fresh tensor each pass and Pillow giving back its freed blocks (its default):
    the peer of engine/host_pixels.py."""
    from PIL import Image

    host, engine.host_pixels = engine.host_pixels, None
    blocks = Image.core.get_blocks_max()
    Image.core.set_blocks_max(0)
    try:
        yield
    finally:
        engine.host_pixels = host
        Image.core.set_blocks_max(blocks)


@contextmanager
def run66_host(engine: Any) -> Iterator[None]:
    """The engine's host as run 66b had it: the text encoders searched, diffusers' noise."""
    with searched_text_encoders(engine), diffusers_noise(engine):
        yield


@contextmanager
def torch_threads(engine: Any, threads: int) -> Iterator[None]:
    """torch's own CPU thread count on the engine's GPU thread instead of the plan's (engine/cpu_threads.py)."""
    engine._gpu.run(functools.partial(torch.set_num_threads, threads))
    try:
        yield
    finally:
        engine._gpu.run(functools.partial(torch.set_num_threads, engine.plan.cpu_threads))


@contextmanager
def synchronised_stage_ends(engine: Any) -> Iterator[None]:
    """Each stage's end waiting for the whole GPU, as before engine/stage_clock.py (session 46's peer)."""
    from imagesmith.engine.pipeline import StageRun

    finish = StageRun.finish_stage

    def finish_after_waiting(run: StageRun, *args: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():  # the CPU smoke run has nothing to wait for
            torch.cuda.synchronize()
        finish(run, *args, **kwargs)

    StageRun.finish_stage = finish_after_waiting  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        StageRun.finish_stage = finish  # type: ignore[method-assign]


def peers_for(engine: Any, names: list[str], torch_threads_at_start: int) -> dict[str, Peer]:
    """The peers asked for by name; the threads peer only where the plan changed torch's count."""
    available: dict[str, Peer] = {
        "pin": functools.partial(searched_execution_device, engine),
        "noise": functools.partial(diffusers_noise, engine),
        "host": functools.partial(run66_host, engine),
        "pixels": functools.partial(fresh_pixel_memory, engine),
        "stagesync": functools.partial(synchronised_stage_ends, engine),
    }
    chosen = engine.plan.cpu_threads
    if chosen and chosen != torch_threads_at_start:
        available["threads"] = functools.partial(torch_threads, engine, torch_threads_at_start)
    unknown = [name for name in names if name not in available and name != "threads"]
    if unknown:
        raise SystemExit(
            f"unknown A/B peers {unknown}: choose from pin, noise, host, pixels, stagesync, threads"
        )
    return {name: available[name] for name in names if name in available}


def _timed_once(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began


def alternating_ab(fn: Callable[[], object], peer: Peer, rounds: int, images: int) -> dict[str, Any]:
    """`rounds` pairs of batches, the peer's first then the engine's, alternating; each side's median and the
    difference of the medians (engine minus peer: negative when the engine is faster)."""
    peer_s: list[float] = []
    engine_s: list[float] = []
    for _ in range(rounds):
        with peer():
            peer_s.append(_timed_once(fn))
        engine_s.append(_timed_once(fn))
    peer_median, engine_median = statistics.median(peer_s), statistics.median(engine_s)
    return {
        "rounds": rounds,
        "peer_runs_s": peer_s,
        "engine_runs_s": engine_s,
        "peer_median_s": peer_median,
        "engine_median_s": engine_median,
        "engine_minus_peer_ms": (engine_median - peer_median) * 1000,
        "peer_images_per_s": images / peer_median,
        "engine_images_per_s": images / engine_median,
    }
