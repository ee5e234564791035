"""IMAGESMITH_DECODER_MATH_ATTENTION: the VAE decoder's attention traced as matmuls and a softmax, only around a
compiled decoder's decode of up to 128x128 latents, torch's flags and order restored after, its own compile
cache, static decoder graphs, the same picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend

from imagesmith.config import CompileChoice, Settings
from imagesmith.engine import Engine, fast
from imagesmith.engine import engine as engine_module
from imagesmith.engine.attention import attention_priority
from imagesmith.engine.decoder_attention import (
    MAX_POSITIONS,
    decoder_attention,
    mark_math_attention,
    math_attention_for,
)
from imagesmith.engine.fast import apply_speed_levers, compile_cache_for, decoder_math_attention_wanted
from imagesmith.engine.hardware import DeviceInfo, plan_hardware
from imagesmith.schemas import GenerationRequest

GPU = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
CPU = DeviceInfo("cpu", name="cpu", capability=None, total_memory_gib=24, free_memory_gib=20)
MATH_ONLY = (False, False, False, True, True)  # flash, memory-efficient, cuDNN, math, bf16/fp16 reductions


def attention_flags() -> tuple[tuple[bool, ...], list[int]]:
    """Which backends may run, whether reduced-precision math is allowed, and torch's priority order."""
    cuda = torch.backends.cuda
    enabled = (
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
        cuda.math_sdp_enabled(),
        cuda.fp16_bf16_reduction_math_sdp_allowed(),
    )
    return enabled, list(torch._C._get_sdp_priority_order())


def test_the_math_path_with_bf16_reductions_is_in_force_inside_and_undone_after_a_failure() -> None:
    before = attention_flags()
    with pytest.raises(RuntimeError, match="boom"), decoder_attention(True):
        assert attention_flags()[0] == MATH_ONLY
        raise RuntimeError("boom")
    assert attention_flags() == before
    with decoder_attention(False):
        assert attention_flags() == before


def test_inside_the_engines_attention_choice_it_gives_back_that_choice_and_its_order() -> None:
    """The engine wraps each pass in attention_priority (cuDNN first, say) and the decode in this."""
    with attention_priority("cudnn"):
        chosen = attention_flags()
        assert SDPBackend(int(chosen[1][0])) == SDPBackend.CUDNN_ATTENTION
        with decoder_attention(True):
            assert attention_flags()[0] == MATH_ONLY
        assert attention_flags() == chosen


class Decoder:
    """What math_attention_for reads of a decoder: the engine's mark and Module.compile's wrapped call."""

    _compiled_call_impl: Any = None


@pytest.mark.parametrize(
    ("marked", "compiled", "side", "math"),
    [
        (True, True, 128, True),  # 1024x1024: where it was measured
        (True, True, 96, True),
        (True, True, 129, False),  # past MAX_POSITIONS the score matrix grows as its square: the kernel
        (True, False, 128, False),  # fallen back to eager after a failed compile
        (False, True, 128, False),  # compiled without the lever
    ],
)
def test_a_decode_uses_the_matmuls_only_compiled_marked_and_up_to_128x128_latents(
    marked: bool, compiled: bool, side: int, math: bool
) -> None:
    decoder = Decoder()
    mark_math_attention(decoder, marked)
    decoder._compiled_call_impl = (lambda: None) if compiled else None
    assert math_attention_for(decoder, torch.zeros(1, 4, side, 128)) is math
    assert MAX_POSITIONS == 128 * 128


@pytest.mark.parametrize(
    ("device", "compile", "asked", "wanted"),
    [
        (GPU, CompileChoice.REDUCE_OVERHEAD, True, True),
        (GPU, CompileChoice.REDUCE_OVERHEAD, False, False),  # opt-in: one decoder graph per image size
        (GPU, CompileChoice.OFF, True, False),  # asked for, still only with the decoder compiled
        (CPU, CompileChoice.DEFAULT, True, True),
    ],
)
def test_it_is_asked_for_and_needs_compile(
    device: DeviceInfo, compile: CompileChoice, asked: bool, wanted: bool
) -> None:
    settings = Settings(compile=compile, decoder_math_attention=asked)
    assert decoder_math_attention_wanted(settings, plan_hardware(device, settings)) is wanted
    assert Settings().decoder_math_attention is False


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


@pytest.mark.parametrize("asked", [True, False])
def test_compiling_marks_the_decoder_keeps_its_graphs_static_and_names_the_lever(
    tiny_settings: Settings, asked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine.start(tiny_settings)
    decoder = engine.models.base.vae.decoder
    options: dict[str, Any] = {}
    monkeypatch.setattr(type(decoder), "compile", lambda self, **kwargs: options.update(kwargs))
    monkeypatch.setattr(fast, "use_persistent_compile_cache", lambda cache: cache)  # no process-wide cache
    settings = tiny_settings.with_changes(compile=CompileChoice.DEFAULT, decoder_math_attention=asked)
    levers = apply_speed_levers(engine.models.base, engine.models.refiner, engine.plan, settings)
    assert decoder._imagesmith_math_attention is asked
    # One static graph a size with it (each size traced under its own path); dynamo's own choice without.
    assert options["dynamic"] is (False if asked else None)
    compile_lever = next(lever for lever in levers if lever.startswith("torch.compile"))
    # In the compile lever's text, so a fall back to eager (which drops that lever) drops it too.
    assert ("attention as matmuls" in compile_lever) is asked


def test_the_engine_decodes_a_compiled_decoder_through_the_math_path_to_the_same_picture(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[tuple[bool, ...], list[int]]] = []
    original = engine_module.decode_latents

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(attention_flags())
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "decode_latents", recording)
    decoder = tiny_engine.models.base.vae.decoder
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=3, seed=5)
    before = attention_flags()

    def picture(math: bool, compiled: bool) -> np.ndarray:
        monkeypatch.setattr(decoder, "_imagesmith_math_attention", math, raising=False)
        # What Module.compile sets, standing in for the compiled call (eager here: the path, not the speed).
        monkeypatch.setattr(decoder, "_compiled_call_impl", decoder._call_impl if compiled else None)
        return np.asarray(tiny_engine.generate(request).images[0], dtype=np.int16)

    plain = picture(math=False, compiled=True)
    through_matmuls = picture(math=True, compiled=True)
    eager_decoder = picture(math=True, compiled=False)
    assert [flags[0] for flags in seen] == [before[0], MATH_ONLY, before[0]]  # never around an eager decoder
    assert attention_flags() == before
    # The same attention computed another way: the picture within one level (fp32 on the CPU).
    assert np.abs(through_matmuls - plain).max() <= 1
    assert np.array_equal(eager_decoder, plain)
