"""IMAGESMITH_ATTENTION_BACKEND: the chosen kernel is first in torch's order while the engine generates,
torch's own order comes back afterwards, and each choice compiles into its own cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.attention import attention_priority, priority_for
from imagesmith.engine.fast import compile_cache_for
from imagesmith.engine.hardware import DeviceInfo, plan_hardware
from imagesmith.schemas import GenerationRequest


def torch_order() -> list[SDPBackend]:
    return [SDPBackend(int(backend)) for backend in torch._C._get_sdp_priority_order()]


@pytest.mark.parametrize("choice", ["flash", "efficient", "cudnn"])
def test_the_choice_goes_first_and_every_fused_kernel_stays_behind_it(choice: str) -> None:
    order = priority_for(choice)
    assert order is not None
    assert order[0].name.lower().startswith(choice)
    # No kernel twice; the others stay as fallbacks (a shape the first does not take still runs fused).
    assert len(set(order)) == len(order)
    assert {SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH} <= set(order)


def test_auto_leaves_torchs_order_alone() -> None:
    before = torch_order()
    assert priority_for("auto") is None
    with attention_priority("auto"):
        assert torch_order() == before


def test_the_order_is_restored_after_the_body_even_when_it_fails() -> None:
    before = torch_order()
    with pytest.raises(RuntimeError, match="boom"), attention_priority("cudnn"):
        assert torch_order()[0] == SDPBackend.CUDNN_ATTENTION
        raise RuntimeError("boom")
    assert torch_order() == before


def test_the_engine_generates_with_the_planned_kernel_first(tiny_settings: Settings) -> None:
    engine = Engine.start(tiny_settings)
    # On the CPU the plan ignores the setting (one attention path there); a CUDA plan would carry it.
    engine.plan = dataclasses.replace(engine.plan, attention="efficient")
    before = torch_order()
    seen: list[SDPBackend] = []
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=2, seed=3)
    engine.generate(request, on_progress=lambda event: seen.append(torch_order()[0]))
    assert seen and set(seen) == {SDPBackend.EFFICIENT_ATTENTION}
    assert torch_order() == before


def test_each_attention_choice_compiles_into_its_own_cache(tmp_path: Path) -> None:
    gpu = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
    settings = Settings(data_dir=tmp_path)
    caches = {
        choice: compile_cache_for(settings, plan_hardware(gpu, Settings(attention_backend=choice)))
        for choice in ("auto", "flash", "cudnn")
    }
    assert len(set(caches.values())) == 3
    assert all(path.parent == tmp_path / "compile-cache" for path in caches.values())
    pinned = Settings(compile_cache_dir=tmp_path / "kernels")
    assert compile_cache_for(pinned, plan_hardware(gpu, pinned)).parent == tmp_path / "kernels"
