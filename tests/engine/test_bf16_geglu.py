"""The feed-forward's GEGLU fused into its first bf16 matmul (IMAGESMITH_FUSED_GEGLU, engine/bf16_geglu.py): the
interleaved weight layout, which feed-forwards fuse, the swap on a whole UNet, the op under torch.compile. Off the
GPU the op computes in fp32 what the Triton kernel computes; the kernel itself and the compiled engine with it:
tests/gpu/test_gpu_bf16_geglu.py."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import FeedForward
from torch import nn
from unet_call import unet_inputs

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.bf16_geglu import (
    FusedGegluFeedForward,
    fusable,
    fuse_bf16_geglu_feed_forwards,
    interleave_halves,
    kernel_fault,
)
from imagesmith.engine.fp8 import Float8Linear


def test_interleaving_puts_each_value_row_before_its_gate_row() -> None:
    rows = torch.arange(8.0).reshape(4, 2)  # value rows 0-1, gate rows 2-3
    assert interleave_halves(rows).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]
    assert interleave_halves(torch.arange(4.0)).tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("bias", [True, False])
def test_the_fused_feed_forward_computes_what_diffusers_feed_forward_computes(bias: bool) -> None:
    torch.manual_seed(0)
    ff = FeedForward(64, activation_fn="geglu", bias=bias).eval()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        expected = ff(x)
        fused = FusedGegluFeedForward(ff)
        got = fused(x)
    assert got.shape == expected.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (fused.bias is None) is not bias
    assert "GEGLU fused into the first matmul, 64 -> 256" in repr(fused)


def test_only_plain_exact_gelu_feed_forwards_of_aligned_widths_fuse() -> None:
    assert fusable(FeedForward(64, activation_fn="geglu"))
    assert not fusable(FeedForward(64, activation_fn="geglu-approximate"))  # tanh gelu: another kernel
    assert not fusable(FeedForward(64, activation_fn="gelu"))
    assert not fusable(FeedForward(60, activation_fn="geglu"))  # TMA rows of 16 bytes: 60 bf16 is 120
    fp8 = FeedForward(64, activation_fn="geglu")
    fp8.net[0].proj = Float8Linear(fp8.net[0].proj, "static")  # engine/fp8_geglu.py's case, not this one
    assert not fusable(fp8)
    assert not fusable(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="not a plain GEGLU feed-forward"):
        FusedGegluFeedForward(FeedForward(64, activation_fn="gelu"))


def test_a_unet_with_its_feed_forwards_fused_gives_the_same_output(tiny_settings: Settings) -> None:
    unet = Engine.start(tiny_settings.with_changes(warmup=False)).models.base.unet
    args, kwargs = unet_inputs(unet.config, rows=2)
    with torch.no_grad():
        expected = unet(*args, **kwargs).sample
        feed_forwards = sum(type(m) is FeedForward for m in unet.modules())
        assert feed_forwards > 0
        assert fuse_bf16_geglu_feed_forwards(unet) == feed_forwards
        assert not any(type(m) is FeedForward for m in unet.modules())
        got = unet(*args, **kwargs).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_op_compiles_in_one_graph() -> None:
    """Opaque to torch.compile through its registered shape (fullgraph: no break around it)."""
    torch.manual_seed(1)
    ff = FeedForward(32, activation_fn="geglu").eval()
    fused = FusedGegluFeedForward(ff)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        expected = ff(x)
        got = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_kernel_check_passes_a_kernel_that_agrees_and_names_what_went_wrong_otherwise() -> None:
    assert kernel_fault("cpu") is None  # the op off the GPU: the fp32 reference, rounded to bf16

    def refuses_to_compile(*args: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("at 1:22:\ndef _gelu_exact(gate: Any) -> Any:\n(more lines)")

    assert kernel_fault("cpu", refuses_to_compile) == "RuntimeError: at 1:22:"

    def computes_something_else(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.ops.imagesmith.bf16_geglu(x, weight, bias) * 1.1

    fault = kernel_fault("cpu", computes_something_else)
    assert fault is not None and "off the fp32 reference by 1.0e-01" in fault

    def wrong_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.ops.imagesmith.bf16_geglu(x, weight, bias)[:, :8]

    assert "its output has shape (200, 8)" in (kernel_fault("cpu", wrong_shape) or "")


def test_a_kernel_that_fails_its_check_is_skipped_by_default_and_an_error_when_asked_for(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine checks the kernel before swapping any module: run 96's kernel, which Triton refused, would have
    failed inside the compiled warm-up instead."""
    from dataclasses import replace

    from imagesmith.engine import bf16_geglu
    from imagesmith.engine.fast import apply_speed_levers

    def fresh() -> tuple[Engine, int]:
        engine = Engine.start(tiny_settings.with_changes(warmup=False))
        return engine, sum(type(m) is FeedForward for m in engine.models.base.unet.modules())

    monkeypatch.setattr(bf16_geglu, "kernel_fault", lambda device: "CompilationError: at 1:22:")
    engine, feed_forwards = fresh()
    plan = replace(engine.plan, fused_geglu=True)  # as the plan says on a Hopper GPU
    with caplog.at_level("WARNING"):
        applied = apply_speed_levers(engine.models.base, None, plan, Settings())  # unset: the default
    assert not any("first bf16 matmul" in lever for lever in applied)
    assert sum(type(m) is FeedForward for m in engine.models.base.unet.modules()) == feed_forwards > 0
    assert "bf16 fused GEGLU skipped: its kernel failed its check on cpu (CompilationError" in caplog.text

    with pytest.raises(RuntimeError, match=r"IMAGESMITH_FUSED_GEGLU=true, but its kernel failed.*=false"):
        apply_speed_levers(engine.models.base, None, plan, Settings(fused_geglu=True))

    monkeypatch.setattr(bf16_geglu, "kernel_fault", lambda device: None)
    engine, feed_forwards = fresh()
    applied = apply_speed_levers(engine.models.base, None, replace(engine.plan, fused_geglu=True), Settings())
    assert f"GEGLU fused into the feed-forwards' first bf16 matmul x{feed_forwards}" in applied
