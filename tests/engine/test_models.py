"""Loading: local folders and hub ids, errors that teach, a refiner failure that leaves the base working."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from imagesmith.config import ModelPreset, Settings
from imagesmith.engine import Engine, ModelLoadError
from imagesmith.engine.tiny import TinyModelUnbuildable, build_tiny_sdxl
from imagesmith.schemas import GenerationRequest


def test_tiny_model_builds_deterministically(
    tmp_path: Path, tiny_settings: Settings, capfd: pytest.CaptureFixture[str]
) -> None:
    base, _ = build_tiny_sdxl(tmp_path / "again")
    # No progress bars among the log lines (IMAGESMITH_LOG_FORMAT=json promises one JSON object per line).
    assert "Writing model shards" not in capfd.readouterr().err
    reference = tiny_settings.tiny_model_dir() / "tiny-sdxl-base"

    def digest(folder: Path) -> str:
        return hashlib.sha256(
            (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
        ).hexdigest()

    assert digest(base) == digest(reference)


def test_a_tiny_model_that_cannot_be_written_is_one_error_and_leaves_no_half_built_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk gave safetensors' own traceback and left `.tiny-building-*` behind, still holding the space."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    def disk_full(self: object, folder: object, **_: object) -> None:
        Path(str(folder)).mkdir(parents=True)
        (Path(str(folder)) / "partial.safetensors").write_bytes(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StableDiffusionXLImg2ImgPipeline, "save_pretrained", disk_full)
    with pytest.raises(TinyModelUnbuildable) as raised:
        build_tiny_sdxl(tmp_path / "tiny-model")
    message = str(raised.value)
    assert f"could not be written to {tmp_path / 'tiny-model'} (No space left on device)" in message
    assert "IMAGESMITH_DATA_DIR" in message
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_the_tiny_model_goes_is_replaced(tmp_path: Path) -> None:
    """shutil.rmtree raised NotADirectoryError on it, a traceback in generate and doctor."""
    (tmp_path / "tiny-model").write_text("x")
    base, _ = build_tiny_sdxl(tmp_path / "tiny-model")
    assert (base / "model_index.json").is_file()


def test_local_folders_load_like_hub_ids(tiny_settings: Settings) -> None:
    """The sdxl preset with base/refiner pointing at folders: the path users take with downloaded weights."""
    folder = tiny_settings.tiny_model_dir()
    settings = tiny_settings.with_changes(
        **{
            "model": ModelPreset.SDXL,
            "base_model": str(folder / "tiny-sdxl-base"),
            "refiner_model": str(folder / "tiny-sdxl-refiner"),
        },
    )
    engine = Engine.start(settings)
    # One copy of the shared parts: the refiner holds the base's text_encoder_2 and VAE objects.
    assert engine.models.refiner.text_encoder_2 is engine.models.base.text_encoder_2
    assert engine.models.refiner.vae is engine.models.base.vae
    assert engine.generate(
        GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=10)
    ).metadata.refined


@pytest.mark.parametrize("compile_mode", ["off", "default"])
def test_loaded_models_are_frozen_for_inference(tiny_settings: Settings, compile_mode: str) -> None:
    """from_pretrained leaves weights requiring grad; torch.compile's caches key on it, so a loaded model and the
    same model built in memory (the benchmarks) would each compile from scratch. Every module is frozen, also
    the projections that fusing QKV (on with compile) creates after loading."""
    engine = Engine.start(tiny_settings.with_changes(compile=compile_mode, warmup=False))
    assert ("fused QKV" in engine.levers) is (compile_mode != "off")
    # With compile the UNets' weights are channels-last (fast.channels_last_wanted: run 89), eager keeps NCHW.
    for unet in (engine.models.base.unet, engine.models.refiner.unet):
        kernels = [
            m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
        ]
        assert kernels and all(
            w.is_contiguous(memory_format=torch.channels_last) is (compile_mode != "off") for w in kernels
        )
    modules = {
        f"{role}.{name}": component
        for role, pipe in (("base", engine.models.base), ("refiner", engine.models.refiner))
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
    }
    assert {"base.unet", "base.vae", "base.text_encoder", "base.text_encoder_2", "refiner.unet"} <= set(
        modules
    )
    for name, module in modules.items():
        assert not module.training, name
        assert not any(parameter.requires_grad for parameter in module.parameters()), name


def test_broken_refiner_leaves_base_only_generation_working(tiny_settings: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    settings = tiny_settings.with_changes(
        **{
            "model": ModelPreset.SDXL,
            "base_model": str(tiny_settings.tiny_model_dir() / "tiny-sdxl-base"),
            "refiner_model": str(empty),
        },
    )
    engine = Engine.start(settings)
    assert engine.models.refiner is None
    assert "has no model_index.json" in engine.refiner_status
    result = engine.generate(GenerationRequest(prompt="x", width=64, height=64, num_inference_steps=10))
    assert not result.metadata.refined and "refiner unavailable" in (result.metadata.not_refined_reason or "")


def test_missing_base_names_model_problem_and_fix(tiny_settings: Settings, tmp_path: Path) -> None:
    settings = tiny_settings.with_changes(
        **{
            "model": ModelPreset.SDXL,
            "base_model": str(tmp_path),
            "refiner_model": "",
        },
    )
    with pytest.raises(ModelLoadError) as caught:
        Engine.start(settings)
    message = str(caught.value)
    assert str(tmp_path) in message and "model_index.json" in message and "Fix:" in message


def test_a_local_folder_that_does_not_load_is_told_the_setting_not_a_download(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Offline, a missing folder's fix was `hf download /its/path`; a damaged built-in tiny model's too."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tiny_settings.with_changes(
        model=ModelPreset.SDXL, base_model=str(tmp_path / "nowhere"), refiner_model=""
    )
    with pytest.raises(ModelLoadError) as caught:
        Engine.start(missing)
    assert (
        caught.value.fix
        == "the folder does not exist: set IMAGESMITH_BASE_MODEL to an existing diffusers folder"
    )
    assert ".." not in str(caught.value)
    shutil.copytree(tiny_settings.tiny_model_dir(), tmp_path / "tiny-model")
    damaged = tiny_settings.with_changes(data_dir=tmp_path)
    for weights in (tmp_path / "tiny-model").rglob("unet/*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError) as caught:
        Engine.start(damaged)
    assert caught.value.fix == (
        f"delete {tmp_path / 'tiny-model'} and run again: the built-in tiny model is built again from scratch"
    )
    # Its model_index.json gone: the fix said to point a setting at a diffusers folder, which no one had set.
    for index in (tmp_path / "tiny-model").rglob("model_index.json"):
        index.unlink()
    with pytest.raises(ModelLoadError) as caught:
        Engine.start(damaged)
    assert "has no model_index.json" in str(caught.value)
    assert caught.value.fix.startswith(f"delete {tmp_path / 'tiny-model'} and run again"), caught.value.fix


def test_a_refiner_named_as_the_base_is_refused_at_load_naming_both_settings(tiny_settings: Settings) -> None:
    """It loaded, then failed the first generation with diffusers' "added time embedding vector" traceback."""
    tiny = tiny_settings.tiny_model_dir()
    swapped = tiny_settings.with_changes(
        model=ModelPreset.SDXL,
        base_model=str(tiny / "tiny-sdxl-refiner"),
        refiner_model=str(tiny / "tiny-sdxl-base"),
    )
    with pytest.raises(ModelLoadError) as caught:
        Engine.start(swapped)
    assert caught.value.role == "base" and "this is a refiner, not a base model" in caught.value.problem
    assert (
        "IMAGESMITH_BASE_MODEL to the base model and IMAGESMITH_REFINER_MODEL to the refiner"
        in caught.value.fix
    )


def test_offline_hub_id_not_cached_says_how_to_fix(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = tiny_settings.with_changes(
        **{
            "model": ModelPreset.SDXL,
            "base_model": "someone/not-downloaded-sdxl",
            "refiner_model": "",
        },
    )
    with pytest.raises(ModelLoadError) as caught:
        Engine.start(settings)
    assert "someone/not-downloaded-sdxl" in str(caught.value)
    assert "HF_HUB_OFFLINE" in str(caught.value)
    assert "`hf download someone/not-downloaded-sdxl`" in str(caught.value)  # a command huggingface_hub has


def test_the_hub_probe_gives_up_after_its_timeout_even_when_the_request_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx's timeout does not cover the name lookup: a resolver that never answers held doctor for as long
    as it liked. The stand-in request hangs for 30 s; the probe answers within its own 0.2 s."""
    import threading
    import time

    import httpx

    from imagesmith.engine.models import hub_unreachable

    released = threading.Event()
    monkeypatch.setattr(httpx, "head", lambda *args, **kwargs: released.wait(30))
    started = time.monotonic()
    try:
        reason = hub_unreachable.__wrapped__(timeout_s=0.2)
    finally:
        released.set()
    assert time.monotonic() - started < 5
    assert reason is not None and reason.endswith(": no answer in 0.2 s (name lookup or connection)")


def test_offline_by_imagesmiths_own_setting_names_that_setting_in_the_fix(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """IMAGESMITH_HF_OFFLINE=true was told to "unset HF_HUB_OFFLINE", a variable the user never set."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = tiny_settings.with_changes(
        model=ModelPreset.SDXL, base_model="someone/not-downloaded-sdxl", refiner_model="", hf_offline=True
    )
    with pytest.raises(ModelLoadError) as caught:
        Engine.start(settings)
    assert "or unset IMAGESMITH_HF_OFFLINE" in str(caught.value), str(caught.value)
    from imagesmith.engine.models import describe_source

    said = describe_source("someone/not-downloaded-sdxl", settings, "IMAGESMITH_BASE_MODEL")
    assert said.will_fail and "Fix: unset IMAGESMITH_HF_OFFLINE for the first load" in said.text, said.text


def test_a_cast_names_no_modules_kept_in_float32(tiny_settings: Settings) -> None:
    """diffusers 0.42 warns of modules 'kept in float32: []' on any cast that names a dtype; the engine's cast of
    the VAE (to a pre-Ampere card's fp32 VAE beside fp16 UNets) must leave logs free of it."""
    import logging

    import torch

    from imagesmith.engine import Engine
    from imagesmith.engine.models import cast_module

    vae = Engine.start(tiny_settings).models.base.vae
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())  # type: ignore[method-assign]
    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_log.addHandler(handler)
    try:
        cast_module(vae, torch.bfloat16)
    finally:
        diffusers_log.removeHandler(handler)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert not [line for line in heard if "kept in float32" in line], heard
