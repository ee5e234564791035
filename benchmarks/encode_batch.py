"""Host time to encode generated images: one image with Pillow vs the banded encoder (engine/png.py, what
encode_image uses for RGB PNGs), and a batch one after another vs engine/output.encode_in_parallel.

After each GPU pass the generation source turns every image into file bytes (PNG by default, with the A1111
parameters embedded). At 1024x1024 that is ~0.14 s per image of noise-like content (what random weights give)
on one core, 1.1 s for a batch of 8: a fifth of a compiled batch-8 pass on an H200 (4.9 s). This measures both
ways on the machine it runs on, for noise and for smooth content (real images sit between the two).

Every encoding is decoded again and compared with its image, and each banded file's size is printed next to
Pillow's.

Usage:  PYTHONPATH=src python benchmarks/encode_batch.py [--images 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import statistics
import time

import numpy as np
from PIL import Image, ImageFilter

from imagesmith.engine.output import encode_image, encode_in_parallel
from imagesmith.schemas import OutputFormat

PARAMETERS = "a lighthouse at dusk\nSteps: 40, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 1024x1024"


def pillow_png(image: Image.Image) -> bytes:
    sink = io.BytesIO()
    image.save(sink, "PNG")
    return sink.getvalue()


def banded_png(image: Image.Image) -> bytes:
    return encode_image(image, OutputFormat.PNG, PARAMETERS)


def photo_like(rng: np.random.Generator) -> Image.Image:
    """Smooth shapes with a little grain: compresses like a photograph (between noise and a ramp)."""
    coarse = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    blurred = np.asarray(
        coarse.resize((1024, 1024), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    )
    return Image.fromarray((blurred + rng.normal(0, 2, blurred.shape)).clip(0, 255).astype(np.uint8))


def one_image(name: str, image: Image.Image, repeats: int) -> None:
    timings: dict[str, list[float]] = {"Pillow": [], "banded": []}
    sizes = {}
    for _ in range(repeats):  # interleaved, so drift hits both alike
        for way, encode in (("Pillow", pillow_png), ("banded", banded_png)):
            began = time.perf_counter()
            data = encode(image)
            timings[way].append(time.perf_counter() - began)
            sizes[way] = len(data)
            with Image.open(io.BytesIO(data)) as back:
                assert np.array_equal(np.asarray(back), np.asarray(image))
    for way, times in timings.items():
        print(
            f"{name:6s} one image, {way:7s} {statistics.median(times):.3f} s  ({min(times):.3f}-{max(times):.3f})"
            f"  {sizes[way]:,} bytes"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 1024)
    smooth = np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8)
    contents = {
        "noise": [
            Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)) for _ in range(args.images)
        ],
        "photo": [photo_like(rng) for _ in range(args.images)],
        "smooth": [Image.fromarray(smooth) for _ in range(args.images)],
    }
    print(f"{os.cpu_count()} CPUs, 1024x1024 PNG, median of {args.repeats}")
    for name, images in contents.items():
        one_image(name, images[0], args.repeats)
    print(f"batches of {args.images}")
    for name, images in contents.items():
        ways = ("Pillow, one after another", "Pillow, encode_in_parallel", "banded, encode_in_parallel")
        timings: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.repeats):  # interleaved, so drift hits all alike
            began = time.perf_counter()
            serial = [pillow_png(image) for image in images]
            timings[ways[0]].append(time.perf_counter() - began)
            began = time.perf_counter()
            parallel = encode_in_parallel([functools.partial(pillow_png, image) for image in images])
            timings[ways[1]].append(time.perf_counter() - began)
            assert parallel == serial  # same bytes, same order
            began = time.perf_counter()
            banded = encode_in_parallel([functools.partial(banded_png, image) for image in images])
            timings[ways[2]].append(time.perf_counter() - began)
            assert banded == [banded_png(image) for image in images]  # deterministic, in order
        for way, times in timings.items():
            print(
                f"{name:6s} {way:26s} {statistics.median(times):.3f} s  ({min(times):.3f}-{max(times):.3f})"
            )


if __name__ == "__main__":
    main()
