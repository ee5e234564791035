"""A miniature SDXL base + refiner with random weights, built offline and deterministically in seconds.

It uses the same diffusers and transformers classes as SDXL 1.0 with tiny sizes and its own byte-level
tokenizer, saved as ordinary diffusers folders, so tests and the demo run the real loading and generation code
on a laptop CPU. Its images are noise: the weights are random. It exists to prove the code path, not the art.

Shapes follow SDXL where the code depends on them: 4 latent channels, a VAE that downsamples by 8, two text
encoders whose hidden states concatenate into the UNet's cross-attention width, the base's six time ids and
the refiner's five (with aesthetic score).
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Bump when the architecture below changes, so an old cached copy is rebuilt.
TINY_MODEL_VERSION = "3"
TEXT_HIDDEN_1, TEXT_HIDDEN_2, TIME_EMBED = 32, 32, 8


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte-to-printable-character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer with a byte-level vocabulary and no merges: every prompt tokenizes, one byte a token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = sorted(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # transformers 5 builds CLIPTokenizer from the vocabulary itself; 4.x reads it from files.
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    else:
        tokenizer = CLIPTokenizer(
            vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), model_max_length=77
        )
    tokenizer.save_pretrained(folder)


def _text_encoders(vocab_size: int, eos_id: int, pad_id: int, bos_id: int) -> tuple[object, object]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            hidden_size=hidden,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=vocab_size,
            hidden_act="gelu",
            projection_dim=32,
        )

    torch.manual_seed(1)
    encoder_1 = CLIPTextModel(config(TEXT_HIDDEN_1))
    torch.manual_seed(2)
    encoder_2 = CLIPTextModelWithProjection(config(TEXT_HIDDEN_2))
    return encoder_1, encoder_2


def _unet(cross_attention_dim: int, time_ids: int, seed: int) -> object:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # Attention only at the lowest resolution (as SDXL puts its 10-layer blocks there) keeps a 1024x1024
    # demo image to a fraction of a second per step on a laptop CPU.
    return UNet2DConditionModel(
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        transformer_layers_per_block=(1, 1, 1),
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED + 32,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
    )


def _vae() -> object:
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    # Four blocks: the same 8x downsampling as SDXL's VAE, so latent sizes match the real model's.
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def _scheduler() -> object:
    from diffusers import EulerDiscreteScheduler

    # SDXL 1.0's scheduler configuration.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


class TinyModelUnbuildable(OSError):
    """The tiny model could not be written (a full disk, a file in its place): said as one line naming where."""

    def __init__(self, target: Path, cause: Exception) -> None:
        reason = getattr(cause, "strerror", None) or str(cause)
        super().__init__(
            f"the built-in tiny model could not be written to {target} ({reason}); free space in the data dir, "
            "remove what is in the model's place, or point IMAGESMITH_DATA_DIR elsewhere, and run again"
        )


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Writing model shards" bars, off while the tiny model is saved: on a first start they went
    to stderr among the log lines, which with IMAGESMITH_LOG_FORMAT=json were not JSON."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def build_tiny_sdxl(target: Path) -> tuple[Path, Path]:
    """Write `target/base` and `target/refiner` as diffusers folders. Deterministic: same bytes every time."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tok_dir = Path(scratch) / "tokenizer"
        _write_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir)
    vocab_size = len(tokenizer)
    encoder_1, encoder_2 = _text_encoders(
        vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    )
    vae = _vae()
    base: Any = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoder_1,
        text_encoder_2=encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(TEXT_HIDDEN_1 + TEXT_HIDDEN_2, time_ids=6, seed=4),
        scheduler=_scheduler(),
    )
    # The refiner conditions on text_encoder_2 only, and on an aesthetic score instead of the target size.
    refiner: Any = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        unet=_unet(TEXT_HIDDEN_2, time_ids=5, seed=5),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=".tiny-building-", dir=target.parent))
    except OSError as error:
        raise TinyModelUnbuildable(target, error) from error
    try:
        with _no_progress_bars():
            base.save_pretrained(building / "tiny-sdxl-base")
            refiner.save_pretrained(building / "tiny-sdxl-refiner")
        (building / "VERSION").write_text(TINY_MODEL_VERSION)
        # Publish atomically: a half-written folder is never mistaken for a model.
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():  # a file where the folder goes: rmtree raised on it
            target.unlink()
        building.rename(target)
    except BaseException as error:
        # A full disk left the half-written folder behind, still holding the space it had taken.
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(error, Exception):  # safetensors' own error for a full disk is not an OSError
            raise TinyModelUnbuildable(target, error) from error
        raise
    return target / "tiny-sdxl-base", target / "tiny-sdxl-refiner"


def ensure_tiny_sdxl(target: Path) -> tuple[Path, Path]:
    """Return the tiny model's folders, building them first if missing or from an older version."""
    version_file = target / "VERSION"
    if version_file.exists() and version_file.read_text().strip() == TINY_MODEL_VERSION:
        return target / "tiny-sdxl-base", target / "tiny-sdxl-refiner"
    log.info("building the tiny SDXL test model in %s (random weights, makes noise)", target)
    return build_tiny_sdxl(target)
