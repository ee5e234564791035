"""A local diffusers pipeline folder checked without loading it: what `imagesmith doctor` says of a model folder.

Why: doctor looked only for model_index.json, so a folder missing unet/ or holding truncated weights passed
(exit 0), and `generate` then failed to start, or ran without the refiner it was checking. Loading the weights
to find out would take minutes and the memory of the models; reading each component's config and each weight
file's safetensors header takes milliseconds and finds what a copy or a download cut short.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# Components of a pipeline that are only configs (no weights): a scheduler, a tokenizer's vocabulary files.
_CONFIG_ONLY = ("scheduler", "tokenizer", "feature_extractor", "image_processor")
_HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its JSON header's length, little-endian u64


def pipeline_folder_problem(folder: Path) -> str | None:
    """The first thing that would stop this pipeline folder loading, or None: a component model_index.json
    names whose folder is missing, a model component without a config.json or a .safetensors weight file, or a
    weight file whose header is cut short or unreadable."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        return f"model_index.json cannot be read ({error})"
    if not isinstance(index, dict):
        return "model_index.json is not a JSON object"
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[:1] == [None]:
            continue  # diffusers' own keys, and optional components left out (null)
        component = folder / name
        if not component.is_dir():
            return f"{name}/ is missing (model_index.json names it)"
        if name.startswith(_CONFIG_ONLY):
            continue
        if not (component / "config.json").is_file():
            return f"{name}/config.json is missing"
        weights = sorted(component.glob("*.safetensors"))
        if not weights:
            return f"{name}/ has no .safetensors weights"
        for file in weights:
            problem = safetensors_header_problem(file)
            if problem:
                return f"{name}/{file.name}: {problem}"
    return None


def safetensors_header_problem(file: Path) -> str | None:
    """Why this file is no whole safetensors file, from its header alone, or None."""
    try:
        size = file.stat().st_size
        with file.open("rb") as stream:
            prefix = stream.read(_HEADER_LENGTH_BYTES)
            if len(prefix) < _HEADER_LENGTH_BYTES:
                return f"{size} bytes, too short for a safetensors file (cut short?)"
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > size - _HEADER_LENGTH_BYTES:
                return "its header runs past the end of the file (cut short?)"
            header = json.loads(stream.read(header_length))
    except (OSError, ValueError) as error:
        return f"its header cannot be read ({error})"
    ends = [
        entry["data_offsets"][1]
        for entry in header.values()
        if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
    ]
    data_bytes = size - _HEADER_LENGTH_BYTES - header_length
    if ends and max(ends) > data_bytes:
        return f"its tensors need {max(ends)} bytes of data, the file holds {data_bytes} (cut short?)"
    return None
