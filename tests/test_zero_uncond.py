"""benchmarks/zero_uncond.py: the base's cross-attentions on the guided rows only give the image the full
computation gives when the negative prompt is empty (its text zeros), and are refused where they would not."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.schemas import GenerationRequest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
REQUEST = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=6, seed=5)


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks folder is not a package
    return importlib.import_module("zero_uncond")


def _pixels(engine: Engine, request: GenerationRequest) -> np.ndarray:
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def test_the_guided_rows_alone_give_the_same_image(module: ModuleType, tiny_settings: Settings) -> None:
    engine = Engine.start(tiny_settings)
    assert engine.models.base.config.force_zeros_for_empty_prompt  # SDXL's base: zeros for an empty negative
    whole = _pixels(engine, REQUEST)
    unet = engine.models.base.unet
    wrapped = module.compute_guided_rows_only(unet)
    assert wrapped == len(module.cross_attentions(unet)) > 0
    calls = []
    for block in module.cross_attentions(unet):
        inner = block.processor.inner
        block.processor.inner = lambda *args, inner=inner, **kwargs: (
            calls.append(args[1].shape[0]) or inner(*args, **kwargs)
        )
    halved = _pixels(engine, REQUEST)
    assert calls and set(calls) == {1}  # one guided row of the two, in every cross-attention
    # fp32 on the CPU: the same image to the last bit of the 8-bit pixels, but for rounding in the matmuls.
    assert np.abs(halved - whole).max() <= 1


def test_with_a_negative_prompt_the_unguided_rows_are_not_zeros(
    module: ModuleType, tiny_settings: Settings
) -> None:
    """What the shortcut must never meet: there it would give another image, so the engine would have to keep
    such passes on the full computation (batch_key already keeps them apart)."""
    engine = Engine.start(tiny_settings)
    request = REQUEST.model_copy(update={"negative_prompt": "blurry"})
    whole = _pixels(engine, request)
    module.compute_guided_rows_only(engine.models.base.unet)
    assert np.abs(_pixels(engine, request) - whole).max() > 1


def test_a_block_with_biased_keys_is_refused(module: ModuleType) -> None:
    from diffusers.models.attention_processor import Attention

    unet = torch.nn.Module()
    unet.block = torch.nn.Module()
    unet.block.attn2 = Attention(query_dim=8, cross_attention_dim=4, heads=2, dim_head=4, bias=True)
    with pytest.raises(ValueError, match="without a bias"):
        module.compute_guided_rows_only(unet)
