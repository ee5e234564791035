"""Full-size SDXL base + refiner with random weights, built in memory from the architecture configs.

Timing does not depend on the weights, so these give real GPU numbers without downloading 13 GB. The classes
are the ones the public checkpoints load into (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTextModelWithProjection); the tokenizers are byte-level CLIP tokenizers built offline (token ids < 514,
far below the encoders' vocab_size of 49408; the text does not change the work: every prompt pads to 77).

`architecture("full")` reads sdxl-architecture.json beside this file (a copy of shared/reference's);
`architecture("smoke")` is the same structure at toy sizes, to prove the benchmark's code path on a CPU.
"""

from __future__ import annotations

import copy
import inspect
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagesmith.engine.models import cast_module

HERE = Path(__file__).resolve().parent
ARCHITECTURE_JSON = HERE / "sdxl-architecture.json"

UNET_KEY, VAE_KEY = "unet (UNet2DConditionModel)", "vae (AutoencoderKL)"
TE1_KEY, TE2_KEY = "text_encoder (CLIPTextModel)", "text_encoder_2 (CLIPTextModelWithProjection)"
SCHED_KEY = "scheduler (EulerDiscreteScheduler)"


def architecture(size: str) -> dict[str, Any]:
    arch = json.loads(ARCHITECTURE_JSON.read_text())
    if size == "full":
        return arch
    if size != "smoke":
        raise ValueError(f"size must be 'full' or 'smoke', got {size!r}")
    base, refiner = arch["base"], arch["refiner"]
    # Toy sizes, same structure and the same conditioning arithmetic:
    # base cross_attention = te1.hidden + te2.hidden; class-embedding input = te2.projection + n_time_ids * time_dim.
    te = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
    }
    base[TE1_KEY].update(te)
    base[TE2_KEY].update(te)
    small_unet = {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 1],
        "layers_per_block": 1,
        "addition_time_embed_dim": 8,
        "norm_num_groups": 8,
        "sample_size": 8,
    }
    base[UNET_KEY].update(
        small_unet, cross_attention_dim=64, projection_class_embeddings_input_dim=32 + 6 * 8
    )
    refiner[UNET_KEY].update(
        small_unet, cross_attention_dim=32, projection_class_embeddings_input_dim=32 + 5 * 8
    )
    base[VAE_KEY].update(
        block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64
    )
    return arch


def make_tokenizer() -> Any:
    """CLIP's byte-level alphabet and no merges: every prompt tokenizes, one byte a token (as tiny.py does)."""
    from transformers import CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    symbols = sorted(chr(c) for c in chars)
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 5
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    with tempfile.TemporaryDirectory() as folder:  # transformers 4 reads files
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            vocab_file=f"{folder}/vocab.json", merges_file=f"{folder}/merges.txt", model_max_length=77
        )


@dataclass
class Components:
    """Everything the two pipelines are made of; text_encoder_2 and vae are shared, as the engine shares them."""

    text_encoder: Any
    text_encoder_2: Any
    vae: Any
    base_unet: Any
    refiner_unet: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler_config: dict[str, Any]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "vae": self.vae,
            "base_unet": self.base_unet,
            "refiner_unet": self.refiner_unet,
        }

    def to(self, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> None:
        for name, module in self.modules().items():
            # Not module.to: diffusers' models would warn of modules "kept in float32: []" (none) on each cast.
            cast_module(module, vae_dtype if (name == "vae" and vae_dtype is not None) else dtype)


def _text_config(cfg: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **cfg,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_components(
    arch: dict[str, Any], device: str, seed: int = 0, weight_scale: float = 1.0
) -> Components:
    """Construct every module directly on `device` in fp32 with the constructors' random init (seeded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base, refiner = arch["base"], arch["refiner"]
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(_text_config(base[TE1_KEY], tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(base[TE2_KEY], tokenizer))
        vae = AutoencoderKL(**base[VAE_KEY])
        base_unet = UNet2DConditionModel(**base[UNET_KEY])
        refiner_unet = UNet2DConditionModel(**refiner[UNET_KEY])
    components = Components(
        text_encoder,
        text_encoder_2,
        vae,
        base_unet,
        refiner_unet,
        tokenizer,
        copy.deepcopy(tokenizer),
        dict(base[SCHED_KEY]),
    )
    for module in components.modules().values():
        module.eval().requires_grad_(False)
        if weight_scale != 1.0:
            with torch.no_grad():
                for parameter in module.parameters():
                    if parameter.dim() > 1:
                        parameter.mul_(weight_scale)
    return components


def parameter_counts(components: Components) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in components.modules().items()}


def make_scheduler(config: dict[str, Any]) -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**config)


def build_pipelines(components: Components, separate_refiner_copies: bool = False) -> tuple[Any, Any]:
    """Base txt2img + refiner img2img. The refiner shares text_encoder_2 and vae with the base, as the engine and
    diffusers' documented ensemble do; `separate_refiner_copies` gives it its own copies instead, as the seed
    (two independent from_pretrained calls) has."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    c = components
    base = StableDiffusionXLPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        text_encoder_2=c.text_encoder_2,
        tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2,
        unet=c.base_unet,
        scheduler=make_scheduler(c.scheduler_config),
    )
    text_encoder_2, vae = c.text_encoder_2, c.vae
    if separate_refiner_copies:
        text_encoder_2, vae = copy.deepcopy(text_encoder_2), copy.deepcopy(vae)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=c.tokenizer_2,
        unet=c.refiner_unet,
        scheduler=make_scheduler(c.scheduler_config),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipes: tuple[Any, Any] = (base, refiner)  # diffusers' mixins hide set_progress_bar_config from mypy
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def run_two_stage(
    base: Any,
    refiner: Any,
    prompt: str,
    base_kwargs: dict[str, Any],
    refine_kwargs: dict[str, Any],
    between_stages: Callable[[], None] | None = None,
) -> Any:
    """Plain diffusers, as the seed and diffusers' documented ensemble run it: the base to latents, then the
    refiner to a PIL image (decode inside), each with generator seed 1. `between_stages` runs in between (a
    benchmark's clock)."""
    latents = base(
        prompt=prompt, output_type="latent", generator=torch.Generator("cpu").manual_seed(1), **base_kwargs
    ).images
    if between_stages is not None:
        between_stages()
    return refiner(
        prompt=prompt, image=latents, generator=torch.Generator("cpu").manual_seed(1), **refine_kwargs
    ).images[0]
