"""IMAGESMITH_DECODER_MATH_ATTENTION: the VAE decoder's attention traced as matmuls and a softmax, only around a
compiled decoder's decode, torch's flags restored after, its own compile cache, the same picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imagesmith.config import CompileChoice, Settings
from imagesmith.engine import Engine
from imagesmith.engine import engine as engine_module
from imagesmith.engine.decoder_attention import decoder_attention
from imagesmith.engine.fast import compile_cache_for, decoder_math_attention_wanted
from imagesmith.engine.hardware import DeviceInfo, plan_hardware
from imagesmith.schemas import GenerationRequest

GPU = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
CPU = DeviceInfo("cpu", name="cpu", capability=None, total_memory_gib=24, free_memory_gib=20)


def attention_flags() -> tuple[bool, bool, bool, bool]:
    cuda = torch.backends.cuda
    return (
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
        cuda.fp16_bf16_reduction_math_sdp_allowed(),
    )


def test_the_math_path_with_bf16_reductions_is_in_force_inside_and_undone_after_a_failure() -> None:
    before = attention_flags()
    with pytest.raises(RuntimeError, match="boom"), decoder_attention(True):
        assert attention_flags() == (False, False, True, True)
        raise RuntimeError("boom")
    assert attention_flags() == before
    with decoder_attention(False):
        assert attention_flags() == before


@pytest.mark.parametrize(
    ("device", "compile", "asked", "wanted"),
    [
        (GPU, CompileChoice.REDUCE_OVERHEAD, None, True),  # the measured case: on by default
        (GPU, CompileChoice.OFF, None, False),  # eager, the math path is the slow one
        (GPU, CompileChoice.OFF, True, False),  # asked for, still only with the decoder compiled
        (GPU, CompileChoice.DEFAULT, False, False),
        (CPU, CompileChoice.DEFAULT, None, False),  # unmeasured off CUDA
        (CPU, CompileChoice.DEFAULT, True, True),
    ],
)
def test_it_follows_compile_on_cuda_unless_set(
    device: DeviceInfo, compile: CompileChoice, asked: bool | None, wanted: bool
) -> None:
    settings = Settings(compile=compile, decoder_math_attention=asked)
    assert decoder_math_attention_wanted(settings, plan_hardware(device, settings)) is wanted


def test_with_and_without_it_the_decoder_compiles_into_separate_caches(tmp_path: Path) -> None:
    """The traced graph holds one attention call either way, so a shared cache would hand one the other's."""
    caches = {
        asked: compile_cache_for(settings, plan_hardware(GPU, settings))
        for asked in (True, False)
        for settings in [
            Settings(data_dir=tmp_path, compile=CompileChoice.DEFAULT, decoder_math_attention=asked)
        ]
    }
    assert caches[True] != caches[False] and caches[True].parent == caches[False].parent


def test_the_engine_decodes_a_compiled_decoder_through_the_math_path_to_the_same_picture(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bool, bool, bool, bool]] = []
    original = engine_module.decode_latents

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(attention_flags())
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "decode_latents", recording)
    decoder = tiny_engine.models.base.vae.decoder
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=3, seed=5)
    before = attention_flags()

    def picture(math: bool, compiled: bool) -> np.ndarray:
        monkeypatch.setattr(tiny_engine, "decoder_math_attention", math)
        # What Module.compile sets, standing in for the compiled call (eager here: the path, not the speed).
        monkeypatch.setattr(decoder, "_compiled_call_impl", decoder._call_impl if compiled else None)
        return np.asarray(tiny_engine.generate(request).images[0], dtype=np.int16)

    plain = picture(math=False, compiled=True)
    through_matmuls = picture(math=True, compiled=True)
    eager_decoder = picture(math=True, compiled=False)
    assert seen == [before, (False, False, True, True), before]  # never around an eager decoder
    assert attention_flags() == before
    # The same attention computed another way: the picture within one level (fp32 on the CPU).
    assert np.abs(through_matmuls - plain).max() <= 1
    assert np.array_equal(eager_decoder, plain)
