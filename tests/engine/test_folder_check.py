"""engine/folder_check.py: a local pipeline folder's components checked without loading them (doctor)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagesmith.engine.folder_check import pipeline_folder_problem


def pipeline_folder(root: Path) -> Path:
    """A folder as diffusers saves a pipeline: model_index.json, a model component with its config and
    weights, a scheduler (config only), and an optional component left out (null)."""
    root.mkdir()
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None],
        "force_zeros_for_empty_prompt": True,
    }
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text("{}")
    save_file({"weight": torch.zeros(64, 64)}, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    return root


def test_a_whole_folder_passes(tmp_path: Path) -> None:
    assert pipeline_folder_problem(pipeline_folder(tmp_path / "model")) is None


def test_a_missing_component_or_config_is_named(tmp_path: Path) -> None:
    """doctor looked for model_index.json alone: a folder without unet/ passed, and generate failed to start."""
    folder = pipeline_folder(tmp_path / "model")
    (folder / "unet" / "config.json").unlink()
    assert pipeline_folder_problem(folder) == "unet/config.json is missing"
    for file in (folder / "unet").iterdir():
        file.unlink()
    (folder / "unet").rmdir()
    assert pipeline_folder_problem(folder) == "unet/ is missing (model_index.json names it)"


def test_weights_cut_short_are_named_by_file(tmp_path: Path) -> None:
    """Truncated weights passed doctor; the refiner then failed to load and generate ran without it."""
    folder = pipeline_folder(tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-100])  # the header whole, the tensor's data cut
    problem = pipeline_folder_problem(folder)
    assert problem is not None and problem.startswith(
        "unet/diffusion_pytorch_model.safetensors: its tensors need"
    )
    weights.write_bytes(whole[:10])  # the header itself cut
    problem = pipeline_folder_problem(folder)
    assert problem is not None and "its header runs past the end of the file" in problem
    weights.write_bytes(b"abc")
    problem = pipeline_folder_problem(folder)
    assert problem is not None and "too short for a safetensors file" in problem
