"""Load the base and refiner from a hub id or a local diffusers folder, placed as the hardware plan says.

The refiner is built around the base's text_encoder_2 and VAE, so each lives in memory once (the public SDXL
refiner ships its own copies of both; they are the same weights). A refiner that fails to load leaves the base
working: the failure is kept and reported, never hidden.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagesmith.config import ENV_PREFIX, ModelPreset, Settings, prepared_data_dir
from imagesmith.engine.hardware import HardwarePlan

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded. The message names the model, what was missing and how to fix it."""

    def __init__(self, role: str, source: str, problem: str, fix: str) -> None:
        self.role, self.source, self.problem, self.fix = role, source, problem, fix
        super().__init__(f"could not load the {role} model '{source}': {problem}. Fix: {fix}")


@dataclass(frozen=True)
class ModelSources:
    base: str
    refiner: str | None
    vae: str | None


@dataclass
class LoadedModels:
    base: Any  # StableDiffusionXLPipeline
    refiner: Any | None  # StableDiffusionXLImg2ImgPipeline
    refiner_error: str | None
    sources: ModelSources


def unets_of(base: Any, refiner: Any | None) -> list[Any]:
    """The pipelines' UNets, the base's first: what the speed levers, fp8 and its calibration work on."""
    return [base.unet] + ([refiner.unet] if refiner is not None else [])


def resolve_sources(settings: Settings) -> ModelSources:
    """Turn settings into the folders or hub ids to load; the tiny preset is built here on first use."""
    if settings.model is ModelPreset.TINY:
        from imagesmith.engine.tiny import ensure_tiny_sdxl

        prepared_data_dir(settings.data_dir)
        base, refiner = ensure_tiny_sdxl(settings.tiny_model_dir())
        return ModelSources(base=str(base), refiner=str(refiner), vae=None)
    return ModelSources(
        base=settings.base_model,
        refiner=settings.refiner_model or None,
        vae=settings.vae_model or None,
    )


def offline(settings: Settings) -> bool:
    return settings.hf_offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def offline_setting(settings: Settings) -> str:
    """The variable that made the process offline, as the user set it (to name it in a fix)."""
    return "IMAGESMITH_HF_OFFLINE" if settings.hf_offline else "HF_HUB_OFFLINE"


@dataclass(frozen=True)
class SourceCheck:
    """What `doctor` says about one model source, and whether loading it is sure to fail."""

    text: str
    will_fail: bool = False


def looks_like_a_path(source: str) -> bool:
    """A source written as a path (not a hub id), whether or not it exists."""
    return source.startswith((".", "/", "~"))


def download_elsewhere(source: str, setting: str) -> str:
    """The fix for a hub id this machine cannot fetch."""
    return (
        f"`hf download {source} --local-dir DIR` on a machine that reaches the hub, copy DIR here and set "
        f"{setting} to it"
    )


def describe_source(
    source: str, settings: Settings, setting: str, index_file: str = "model_index.json"
) -> SourceCheck:
    """Does this source resolve, without loading it? `setting`: the environment name of the setting that
    chose it, for the fix. `index_file`: the file that makes a folder loadable (a pipeline's
    model_index.json; a lone VAE's config.json)."""
    path = Path(source).expanduser()
    if path.exists():
        if (path / index_file).exists():
            from imagesmith.engine.folder_check import pipeline_folder_problem

            problem = pipeline_folder_problem(path) if index_file == "model_index.json" else None
            if problem:
                return SourceCheck(
                    f"local folder that will not load: {problem}; "
                    + (
                        _tiny_model_fix(path, settings)
                        or f"copy the whole model again, or set {setting} to one"
                    ),
                    True,
                )
            return SourceCheck(f"local folder, {index_file} present, its components whole")
        kind = (
            "a diffusers pipeline folder" if index_file == "model_index.json" else "a diffusers model folder"
        )
        return SourceCheck(f"local folder WITHOUT {index_file} (not {kind}); set {setting} to one", True)
    if looks_like_a_path(source):
        return SourceCheck(f"local path that does not exist; set {setting} to an existing folder", True)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, index_file)
    if isinstance(cached, str):
        return SourceCheck("hub id, in the local cache")
    fetch_elsewhere = download_elsewhere(source, setting)
    if offline(settings):
        return SourceCheck(
            f"hub id, not cached: offline mode, will fail. Fix: unset {offline_setting(settings)} for the first "
            "load, or "
            f"{fetch_elsewhere}",
            True,
        )
    unreachable = hub_unreachable()
    if unreachable:
        # "downloads on first load" would be a promise the first request breaks, minutes into a start.
        return SourceCheck(
            f"hub id, not cached, and the hub is not reachable ({unreachable}): the first load will fail. "
            f"Fix: {fetch_elsewhere}",
            True,
        )
    return SourceCheck("hub id, not cached: downloads on first load")


@functools.cache
def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT, huggingface.co by default) cannot be reached from here, or None
    when it answers. Any HTTP answer counts as reachable: the question is the network, not the status. Asked
    once per process (doctor names two or three models).

    The request runs on a daemon thread that is waited for at most timeout_s: httpx's timeout does not cover
    the name lookup, and a resolver that never answers would otherwise hold doctor for as long as it likes."""
    import threading

    import httpx
    from huggingface_hub import constants

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            httpx.head(constants.ENDPOINT, timeout=timeout_s)
        except httpx.HTTPError as error:
            outcome.append(f"{constants.ENDPOINT}: {type(error).__name__}")
        else:
            outcome.append(None)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"{constants.ENDPOINT}: no answer in {timeout_s:g} s (name lookup or connection)"
    return outcome[0]


def _load_kwargs(source: str, plan: HardwarePlan, settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": plan.dtype, "use_safetensors": True}
    if offline(settings):
        kwargs["local_files_only"] = True
    return kwargs


def _from_pretrained(
    cls: Any, role: str, source: str, plan: HardwarePlan, settings: Settings, **extra: Any
) -> Any:
    """from_pretrained with the 16-bit variant when one exists (half the download), and errors that teach."""
    kwargs = {**_load_kwargs(source, plan, settings), **extra}
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "model_index.json").exists() and role != "VAE":
            raise ModelLoadError(
                role,
                source,
                "the folder has no model_index.json",
                _tiny_model_fix(local, settings)  # the built-in model's: no one pointed a setting at it
                or "point it at a diffusers pipeline folder (save_pretrained output), not a single .safetensors file",
            )
        attempts: list[str | None] = [None]
    else:
        # The SDXL repos publish an "fp16" variant; there is no "fp32" variant (the seed asked for one).
        attempts = ["fp16", None] if plan.dtype_name in ("fp16", "bf16") else [None]
    last_error: Exception | None = None
    for variant in attempts:
        try:
            return cls.from_pretrained(str(local) if local.exists() else source, variant=variant, **kwargs)
        except (OSError, ValueError) as error:
            last_error = error
            log.debug("loading %s %s with variant=%s failed: %s", role, source, variant, error)
    assert last_error is not None
    problem = str(last_error).splitlines()[0][:300].rstrip(".")  # the message adds its own full stop
    raise ModelLoadError(role, source, problem, _load_fix(role, source, local, settings)) from last_error


def _load_fix(role: str, source: str, local: Path, settings: Settings) -> str:
    """How to fix a model that did not load, by what the source is: a folder (the built-in tiny model's or the
    user's), a path that does not exist, or a hub id (offline, unreachable, or neither). A folder's fix used
    to be `hf download /its/path` whenever the hub was offline."""
    setting = f"{ENV_PREFIX}{role.upper()}_MODEL"  # base_model, refiner_model, vae_model
    if local.exists():
        return _tiny_model_fix(local, settings) or (
            f"check the folder is a complete diffusers save (unet/, vae/, text encoders, scheduler/), or set "
            f"{setting} to one"
        )
    if looks_like_a_path(source):
        return f"the folder does not exist: set {setting} to an existing diffusers folder"
    if offline(settings):
        # `hf`: huggingface_hub's command since 1.0 (the `huggingface-cli` these lines named is gone in 2.x).
        return (
            f"download it once with network access (`hf download {source}`), or unset "
            f"{offline_setting(settings)}"
        )
    unreachable = hub_unreachable()
    if unreachable:
        return f"the hub is not reachable ({unreachable}): {download_elsewhere(source, setting)}"
    return "check the hub id, log in with `hf auth login` for gated repos, or use a local folder"


def _tiny_model_fix(local: Path, settings: Settings) -> str | None:
    """The fix for a damaged folder of the built-in tiny model (rebuild it); None for any other folder."""
    tiny = settings.tiny_model_dir()
    if local.resolve().is_relative_to(tiny.resolve()):
        return f"delete {tiny} and run again: the built-in tiny model is built again from scratch"
    return None


def _place(pipe: Any, plan: HardwarePlan) -> None:
    """Put a pipeline where the plan says: on the device, or offloaded to the CPU between uses."""
    if plan.offload == "model":
        pipe.enable_model_cpu_offload(device=plan.device)
    elif plan.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=plan.device)
    else:
        pipe.to(plan.device)
    pipe.set_progress_bar_config(disable=True)


def cast_module(module: Any, dtype: Any) -> None:
    """Casts a diffusers model's weights to `dtype` without diffusers' warning.

    diffusers 0.42's ModelMixin.to warns "There are modules in ... that should be kept in float32: []" on every
    cast that names a dtype, even when the model keeps no module in float32 (the list it prints is empty). So
    torch's own Module.to casts a model that keeps none (SDXL's VAE and UNets); one that keeps some is cast by
    diffusers, whose warning then says something."""
    import torch

    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(dtype=dtype)
    else:
        torch.nn.Module.to(module, dtype=dtype)


def _freeze_for_inference(pipe: Any) -> None:
    """Every module of the pipeline in eval mode with weights that do not require grad.

    from_pretrained leaves the weights requiring grad. The pipelines run under no_grad, so that costs nothing
    per step, but torch.compile's caches key on it: a model built in memory and frozen (the benchmarks) missed
    the compile cache of the same model loaded from disk (every run's queue benchmark, runs 27-36 in
    docs/benchmarks.md: 428-483 s of compiling instead of a warm start). Frozen here, a tensor computed outside
    no_grad cannot hold an autograd graph either."""
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)


def load_models(settings: Settings, plan: HardwarePlan) -> LoadedModels:
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Their "Loading pipeline components" and "Loading weights" bars broke into the CLI's stage bars and into
    # the server's log lines; the line per model below says the same. The hub's download bars (a first
    # start's 13 GB) are huggingface_hub's and stay.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    sources = resolve_sources(settings)
    extra: dict[str, Any] = {}
    if sources.vae:
        log.info("loading VAE %s", sources.vae)
        extra["vae"] = _from_pretrained(AutoencoderKL, "VAE", sources.vae, plan, settings)
    log.info("loading base model %s", sources.base)
    base = _from_pretrained(StableDiffusionXLPipeline, "base", sources.base, plan, settings, **extra)
    if base.text_encoder is None:
        # A refiner loads as a base pipeline without its first text encoder, then fails the first generation
        # deep in diffusers ("Model expects an added time embedding vector of length ...").
        raise ModelLoadError(
            "base",
            sources.base,
            "it has no text_encoder, as SDXL's refiner has none: this is a refiner, not a base model",
            "set IMAGESMITH_BASE_MODEL to the base model and IMAGESMITH_REFINER_MODEL to the refiner "
            "(swapped?)",
        )
    # The VAE may run in another dtype than the UNets (fp32 on pre-Ampere cards with the stock VAE).
    if base.vae.dtype != plan.vae_dtype:
        cast_module(base.vae, plan.vae_dtype)

    refiner, refiner_error = None, None
    if sources.refiner:
        log.info("loading refiner %s (sharing the base's text_encoder_2 and VAE)", sources.refiner)
        try:
            refiner = _from_pretrained(
                StableDiffusionXLImg2ImgPipeline,
                "refiner",
                sources.refiner,
                plan,
                settings,
                text_encoder_2=base.text_encoder_2,
                vae=base.vae,
            )
        except Exception as error:  # any failure leaves base-only generation working
            refiner_error = str(error)
            log.warning("refiner unavailable, generation will be base-only: %s", refiner_error)
    for pipe in (base, refiner):
        if pipe is not None:
            _freeze_for_inference(pipe)
            _place(pipe, plan)
    return LoadedModels(base=base, refiner=refiner, refiner_error=refiner_error, sources=sources)
