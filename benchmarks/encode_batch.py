"""Host time to encode a batch of generated images: one after another vs engine/output.encode_in_parallel.

After each GPU pass the generation source turns every image into file bytes (PNG by default, with the A1111
parameters embedded). At 1024x1024 that is ~0.14 s per image of noise-like content (what random weights give)
on one core, 1.1 s for a batch of 8: a fifth of a compiled batch-8 pass on an H200 (4.9 s). This measures both
ways on the machine it runs on, for noise and for smooth content (real images sit between the two).

Usage:  PYTHONPATH=src python benchmarks/encode_batch.py [--images 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import numpy as np
from PIL import Image

from imagesmith.engine.output import encode_in_parallel


def encode_png(image: Image.Image) -> bytes:
    sink = io.BytesIO()
    image.save(sink, "PNG")
    return sink.getvalue()


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
        "smooth": [Image.fromarray(smooth) for _ in range(args.images)],
    }
    print(f"{os.cpu_count()} CPUs, {args.images} images of 1024x1024 PNG, median of {args.repeats}")
    for name, images in contents.items():
        timings: dict[str, list[float]] = {"one after another": [], "encode_in_parallel": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            began = time.perf_counter()
            serial = [encode_png(image) for image in images]
            timings["one after another"].append(time.perf_counter() - began)
            began = time.perf_counter()
            parallel = encode_in_parallel([lambda image=image: encode_png(image) for image in images])
            timings["encode_in_parallel"].append(time.perf_counter() - began)
            assert parallel == serial  # same bytes, same order
        for way, times in timings.items():
            print(
                f"{name:6s} {way:18s} {statistics.median(times):.3f} s  ({min(times):.3f}-{max(times):.3f})"
            )


if __name__ == "__main__":
    main()
