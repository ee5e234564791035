"""Image files with their generation parameters inside, in AUTOMATIC1111's "parameters" text format.

PNG keeps it in a tEXt chunk named "parameters"; JPEG and WebP in EXIF UserComment (UNICODE prefix,
UTF-16BE), which is where A1111's "PNG Info" tab, Civitai and similar tools look. The format:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 40, Sampler: Euler, CFG scale: 7.5, Seed: 1234, Size: 1024x1024, ...
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from PIL import Image, PngImagePlugin

from imagesmith import __version__
from imagesmith.engine.png import encode_png
from imagesmith.image_metadata import read_user_comment, set_user_comment
from imagesmith.schemas import GenerationMetadata, OutputFormat, RefineMode

# A1111's own pattern for one "Key: value" pair; values with commas or colons are JSON-quoted.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def model_label(source: str | None) -> str:
    return "" if not source else Path(source.rstrip("/")).name


def _quote(value: str) -> str:
    return json.dumps(value) if any(ch in value for ch in ',:\n"') else value


def a1111_parameters(meta: GenerationMetadata, index: int) -> str:
    """The parameters text for image `index` of a generation: what really ran, with that image's own seed."""
    from imagesmith.engine.schedulers import A1111_SAMPLER_NAMES

    request = meta.request
    report = meta.images[index]
    pairs: list[tuple[str, object]] = [
        ("Steps", request.num_inference_steps),
        ("Sampler", A1111_SAMPLER_NAMES[request.scheduler]),
        ("CFG scale", request.guidance_scale),
        ("Seed", report.seed),
        ("Size", f"{report.width}x{report.height}"),
        ("Model", model_label(meta.base_model)),
    ]
    if report.refined and meta.refiner_model:
        pairs.append(("Refiner", model_label(meta.refiner_model)))
        if meta.refine_mode_ran is RefineMode.ENSEMBLE:
            pairs.append(("Refiner switch at", request.high_noise_frac))
        else:
            pairs += [("Refiner steps", request.refine_steps), ("Refiner strength", request.refine_strength)]
    pairs.append(("Refine mode", meta.refine_mode_ran.value if report.refined else "none"))
    if report.not_refined_reason:
        pairs.append(("Not refined", report.not_refined_reason))
    pairs.append(("Version", f"imagesmith {__version__}"))
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in pairs))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Read the text back: {"prompt", "negative_prompt", and each key of the last line}."""
    *head, last = text.strip().split("\n")
    if not _PARAM.findall(last) or len(_PARAM.findall(last)) < 3:
        head, last = [*head, last], ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        result[key.strip()] = value
    return result


def encode_image(image: Image.Image, output_format: OutputFormat, parameters: str) -> bytes:
    """The file's bytes, parameters embedded. JPEG at quality 92 and WebP at 90: good for the web."""
    buffer = io.BytesIO()
    write_image(image, buffer, output_format, parameters)
    return buffer.getvalue()


# Pillow's encoders release the GIL, so threads encode in parallel: 8 PNGs of 1024x1024 took 0.94 s one after
# another and 0.48 s on two threads (this 2-core machine). A batch of 8 generated images used to spend ~1 s of
# host time encoding after each GPU pass (docs/benchmarks.md, queue throughput); with one thread per core it is
# about one image's time.
_ENCODERS = ThreadPoolExecutor(
    max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="imagesmith-encode"
)


def encode_in_parallel(encoders: Sequence[Callable[[], bytes]]) -> list[bytes]:
    """Run each encoder (a thunk giving file bytes) on the encoding threads; results in the given order."""
    if len(encoders) <= 1:
        return [encode() for encode in encoders]
    return list(_ENCODERS.map(lambda encode: encode(), encoders))


def write_image(
    image: Image.Image, target: str | Path | BinaryIO, output_format: OutputFormat, parameters: str
) -> None:
    if output_format is OutputFormat.PNG and image.mode == "RGB":
        # On several threads (engine/png.py says why); the same file Pillow would write, within a few hundred bytes.
        data = encode_png(image, {"parameters": parameters})
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(data)
        else:
            target.write(data)
        return
    if output_format is OutputFormat.PNG:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(target, format="PNG", pnginfo=info)
        return
    exif = set_user_comment(Image.Exif(), parameters)
    if output_format is OutputFormat.JPEG:
        image.convert("RGB").save(target, format="JPEG", quality=92, exif=exif.tobytes())
    else:
        image.save(target, format="WEBP", quality=90, exif=exif.tobytes())


def read_parameters(source: str | Path | BinaryIO | bytes) -> str | None:
    """The embedded parameters text of a PNG, JPEG or WebP file, or None."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        if "parameters" in image.info:
            return str(image.info["parameters"])
        return read_user_comment(image)
