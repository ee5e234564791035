"""The text encoders as CUDA graphs (IMAGESMITH_TEXT_ENCODER_GRAPHS, engine/encoder_graphs.py): where the lever
applies, and that a call the graph cannot stand for, or a recording that fails, runs the encoder eager with the
same result. The replay itself needs CUDA: tests/gpu/test_gpu_encoder_graphs.py."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.encoder_graphs import GraphedForward, copied, install, installed
from imagesmith.engine.fast import apply_speed_levers, text_encoder_graphs_wanted
from imagesmith.engine.hardware import DeviceInfo, plan_hardware
from imagesmith.schemas import GenerationRequest

GPU = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
REQUEST = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=4, seed=3)


def test_on_by_default_only_with_cuda_graph_modes_and_never_with_offload_or_off_cuda() -> None:
    resident = plan_hardware(GPU, Settings())
    assert not text_encoder_graphs_wanted(Settings(), resident)
    assert not text_encoder_graphs_wanted(Settings(compile="default"), resident)
    assert text_encoder_graphs_wanted(Settings(compile="reduce-overhead"), resident)
    assert text_encoder_graphs_wanted(Settings(compile="max-autotune"), resident)
    assert text_encoder_graphs_wanted(Settings(text_encoder_graphs=True), resident)
    assert not text_encoder_graphs_wanted(
        Settings(compile="reduce-overhead", text_encoder_graphs=False), resident
    )
    offloaded = plan_hardware(GPU, Settings(offload="model"))
    assert not text_encoder_graphs_wanted(Settings(text_encoder_graphs=True), offloaded)
    assert not text_encoder_graphs_wanted(
        Settings(text_encoder_graphs=True), plan_hardware(DeviceInfo("cpu"), Settings())
    )


def test_the_settings_name_it_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGESMITH_TEXT_ENCODER_GRAPHS", "false")
    assert Settings().text_encoder_graphs is False


def _no_shortcut(tiny_settings: Settings) -> Settings:
    """The tests count levers: without the empty-negative shortcut's."""
    return tiny_settings.with_changes(empty_negative_shortcut=False)


def _tiny_engine(tiny_settings: Settings) -> Engine:
    return Engine.start(_no_shortcut(tiny_settings))


def test_installed_once_per_encoder_module_and_a_cpu_generation_is_unchanged(tiny_settings: Settings) -> None:
    plain = _tiny_engine(tiny_settings)
    expected = np.asarray(plain.generate(REQUEST).images[0])

    engine = _tiny_engine(tiny_settings)
    base, refiner = engine.models.base, engine.models.refiner
    assert refiner is not None and refiner.text_encoder_2 is base.text_encoder_2  # shared, so graphed once
    # A CUDA plan on this CPU machine: the lever installs, and every call (CPU tensors) runs eager.
    plan = dataclasses.replace(engine.plan, device="cuda")
    levers = apply_speed_levers(
        base, refiner, plan, _no_shortcut(tiny_settings).with_changes(text_encoder_graphs=True)
    )
    assert levers == ["text encoders as CUDA graphs x2"]
    first, second = installed(base.text_encoder), installed(base.text_encoder_2)
    assert first is not None and second is not None and first is not second
    assert install(base.text_encoder) is first  # installing again keeps the one there

    heard: list[str] = []
    base.text_encoder.register_forward_hook(lambda *_: heard.append("hook"))  # hooks still run around it
    image = np.asarray(engine.generate(REQUEST).images[0])
    assert np.array_equal(image, expected)
    assert heard and first.replays == second.replays == 0 and first.graph is None  # nothing replayed on a CPU


def test_not_installed_on_a_cpu_plan_even_when_asked_and_the_log_says_why(
    tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _tiny_engine(tiny_settings)
    with caplog.at_level(logging.WARNING):
        levers = apply_speed_levers(
            engine.models.base,
            engine.models.refiner,
            engine.plan,
            _no_shortcut(tiny_settings).with_changes(text_encoder_graphs=True),
        )
    assert levers == []
    assert installed(engine.models.base.text_encoder) is None
    assert "text_encoder_graphs skipped" in caplog.text


def test_calls_the_graph_cannot_stand_for_run_the_encoder_eager(tiny_settings: Settings) -> None:
    encoder = _tiny_engine(tiny_settings).models.base.text_encoder
    graphed = install(encoder)
    ids = torch.randint(0, encoder.config.vocab_size, (1, 77))
    with torch.no_grad():
        assert not graphed.replayable(ids, (), {"output_hidden_states": True})  # a CPU tensor
        out = encoder(ids, output_hidden_states=True)
        eager = graphed.eager_forward(ids, output_hidden_states=True)
    with torch.enable_grad():
        assert not graphed.replayable(ids, (), {})  # autograd would need the graph's intermediates
    assert torch.equal(out.last_hidden_state, eager.last_hidden_state)
    assert torch.equal(out.hidden_states[-2], eager.hidden_states[-2])


def test_a_recording_that_fails_leaves_the_encoder_eager_with_the_reason_logged(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _tiny_engine(tiny_settings)
    encoder = engine.models.base.text_encoder
    graphed = install(encoder)
    # Let a CPU call through to recording, which then fails for real (no CUDA stream on this machine): what a
    # GPU does when an op inside the encoder cannot be captured.
    monkeypatch.setattr(GraphedForward, "replayable", lambda self, *_: self.failure is None)
    ids = torch.randint(0, encoder.config.vocab_size, (1, 77))
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        out = encoder(ids, output_hidden_states=True)
        again = encoder(ids, output_hidden_states=True)
        eager = graphed.eager_forward(ids, output_hidden_states=True)
    assert graphed.failure is not None and graphed.graph is None and graphed.replays == 0
    assert "recording its CUDA graph failed" in caplog.text and caplog.text.count("failed") == 1
    assert torch.equal(out.pooler_output, eager.pooler_output)
    assert torch.equal(again.last_hidden_state, eager.last_hidden_state)
    # Health lists it beside the levers, as it lists a compile that fell back to eager.
    failures = [lever for lever in engine.describe()["speed_levers"] if "CUDA graph failed" in lever]
    assert failures == [f"CLIPTextModel CUDA graph failed, eager instead ({graphed.failure})"]


def test_outputs_are_copied_out_of_the_graphs_memory(tiny_settings: Settings) -> None:
    encoder = _tiny_engine(tiny_settings).models.base.text_encoder_2
    with torch.no_grad():
        output = encoder(torch.randint(0, encoder.config.vocab_size, (1, 77)), output_hidden_states=True)
    copy = copied(output)
    assert type(copy) is type(output) and list(copy.keys()) == list(output.keys())
    assert isinstance(copy.hidden_states, tuple) and len(copy.hidden_states) == len(output.hidden_states)
    for mine, theirs in zip([copy[0], *copy.hidden_states], [output[0], *output.hidden_states], strict=True):
        assert torch.equal(mine, theirs) and mine.data_ptr() != theirs.data_ptr()
