"""fp8 convolutions (IMAGESMITH_FP8_CONVS, engine/fp8_conv.py): which layers convert, the arithmetic (checked off
the GPU through the op's fp32 path on the same e4m3 operands cuDNN gets), the calibration they share with the fp8
linears, the op under torch.compile, the settings' rule (the plan's: test_hardware_plan.py). cuDNN's own
kernel: tests/gpu."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.cudnn_plan_file import PlanChoices, plan_key
from imagesmith.engine.fp8 import E4M3_MAX, calibrate_static_scales, static_layers
from imagesmith.engine.fp8_conv import Float8Conv2d, eligible, quantize_convolutions
from imagesmith.schemas import GenerationRequest


@pytest.fixture(autouse=True)
def _inductor_layout_restored() -> Iterator[None]:
    """An engine with fp8 convolutions forces inductor's channels-last layout process-wide (engine/fast.py)."""
    import torch._inductor.config as inductor_config

    before = inductor_config.force_layout_optimization
    yield
    inductor_config.force_layout_optimization = before


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (1, 1)])
def test_an_fp8_convolution_is_its_quantized_operands_convolved(kernel: int, stride: int) -> None:
    torch.manual_seed(kernel * 10 + stride)
    conv = nn.Conv2d(32, 48, kernel, stride=stride, padding=kernel // 2).to(torch.bfloat16)
    x = torch.randn(2, 32, 12, 12, dtype=torch.bfloat16)
    layer = Float8Conv2d(conv)
    with torch.no_grad():
        y = layer(x)
        expected = conv(x)
        # What cuDNN is handed: x and the filter rounded to e4m3 with one scale each (the input's computed per
        # call until calibrated), convolved exactly, times both scales, plus the bias.
        x_scale = x.float().abs().max() / E4M3_MAX
        x8 = (x.float() / x_scale).to(torch.float8_e4m3fn).float() * x_scale
        w8 = layer.weight_fp8.float().permute(0, 3, 1, 2) * layer.weight_scale
        exact = F.conv2d(x8, w8, conv.bias.float(), stride=stride, padding=kernel // 2)
    assert y.shape == expected.shape and y.dtype == torch.bfloat16
    assert relative_l2(y, exact) < 4e-3  # bf16's rounding of the output only
    assert (
        5e-3 < relative_l2(y, expected) < 6e-2
    )  # e4m3's 3 mantissa bits on both operands: lossy, not broken


def test_only_plain_convolutions_with_16_channel_multiples_are_eligible() -> None:
    assert eligible(nn.Conv2d(32, 64, 3, padding=1)) and eligible(nn.Conv2d(32, 64, 1))
    assert eligible(nn.Conv2d(32, 32, 3, stride=2, padding=1))
    assert not eligible(nn.Conv2d(4, 320, 3, padding=1))  # a UNet's conv_in
    assert not eligible(nn.Conv2d(320, 4, 3, padding=1))  # its conv_out
    assert not eligible(nn.Conv2d(32, 32, 3, padding=0))  # not "same" padding
    assert not eligible(nn.Conv2d(32, 32, 3, padding=1, groups=2))
    assert not eligible(nn.Conv2d(32, 32, 5, padding=2))
    with pytest.raises(ValueError, match="not a convolution"):
        Float8Conv2d(nn.Conv2d(4, 320, 3, padding=1))


def test_a_static_conv_scale_comes_from_the_calibration_and_clips_beyond_it() -> None:
    torch.manual_seed(4)
    layer = Float8Conv2d(nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert calibrate_static_scales([layer], lambda: layer(x)) == 1
        assert layer.input_scale is not None
        assert float(layer.input_scale) == pytest.approx(float(x.abs().max()) * 2 / E4M3_MAX)
        far = layer(x * 100)  # 50x past the calibrated range: saturates at e4m3's largest value, stays finite
    assert torch.isfinite(far).all()
    assert "calibrated" in repr(layer) and "3x3" in repr(layer)


def test_the_engine_converts_every_eligible_unet_convolution_and_calibrates_them(
    tiny_settings: Settings,
) -> None:
    request = GenerationRequest(prompt="a lighthouse", width=64, height=64, num_inference_steps=10, seed=5)
    plain = Engine.start(tiny_settings)
    fp8 = Engine.start(
        tiny_settings.with_changes(fp8=True, fp8_convs=True, encode_ahead=False, warmup_sizes="64x64")
    )
    lever = next(lever for lever in fp8.levers if lever.startswith("fp8 convolutions"))
    # With 2 convolutions left in a UNet's graph inductor would drop channels-last (one per 300 nodes needed).
    import torch._inductor.config as inductor_config

    assert "channels-last" in lever and inductor_config.force_layout_optimization
    unets = [fp8.models.base.unet, fp8.models.refiner.unet]
    converted = [m for unet in unets for m in unet.modules() if isinstance(m, Float8Conv2d)]
    assert int(lever.split(" x")[1].split(" ")[0]) == len(converted) > 0
    for unet in unets:
        # conv_in and conv_out (4 latent channels) stay, as does every convolution outside the UNets.
        assert type(unet.conv_in) is nn.Conv2d and type(unet.conv_out) is nn.Conv2d
        assert not any(isinstance(m, nn.Conv2d) and eligible(m) for m in unet.modules())
    assert not any(isinstance(m, Float8Conv2d) for m in fp8.models.base.vae.modules())
    # One calibration for both kinds of layer, at start-up.
    layers = static_layers(unets)
    assert set(map(id, converted)) <= set(map(id, layers))
    assert all(layer.input_scale is not None for layer in layers)
    a = np.asarray(plain.generate(request).images[0]).astype(float)
    b = np.asarray(fp8.generate(request).images[0]).astype(float)
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert 15 < psnr < 80  # changed (it is lossy), yet the same picture


def test_the_op_compiles_as_one_opaque_call_and_matches_eager() -> None:
    """Under torch.compile the convolution is the custom op (its fake implementation gives the shape); the
    quantization around it is ordinary tensor code the compiler can fuse. aot_eager: no C++ compiler needed."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(6)
    layer = Float8Conv2d(nn.Conv2d(32, 16, 3, stride=2, padding=1).to(torch.bfloat16))
    x = torch.randn(2, 32, 10, 10, dtype=torch.bfloat16)
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        calibrate_static_scales([layer], lambda: layer(x))
        compiled = torch.compile(layer, backend=counter, fullgraph=True)
        assert torch.equal(compiled(x), layer(x))
    assert counter.frame_count == 1
    graph = counter.graphs[0].code
    assert "imagesmith.fp8_conv2d" in graph and "conv2d(" not in graph.replace("fp8_conv2d", "")


def test_quantize_convolutions_counts_what_it_swapped() -> None:
    model = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1))
    assert quantize_convolutions(model) == 1
    assert type(model[0]) is nn.Conv2d and isinstance(model[2], Float8Conv2d)


def test_chosen_plans_survive_a_restart_and_a_bad_file_only_means_choosing_again(tmp_path: Path) -> None:
    key = plan_key("NVIDIA H200", 91900, (16, 128, 128, 320, 320, 3, 3, 1, 1, True, "bfloat16"))
    assert "NVIDIA H200" in key and "91900" in key and "320 320 3 3 1 1 True bfloat16" in key
    path = tmp_path / "cache" / "fp8-conv-plans.json"
    first = PlanChoices(path)
    assert first.get(key) is None
    first.remember(key, 6)
    assert PlanChoices(path).get(key) == 6  # what the next process reads
    assert PlanChoices(path).get(key.replace("91900", "92000")) is None  # another cuDNN: chosen again
    path.write_text("{not json")
    assert PlanChoices(path).get(key) is None
    path.write_text('{"a": -1, "b": "6", "c": 2}')
    assert (PlanChoices(path).get("a"), PlanChoices(path).get("b"), PlanChoices(path).get("c")) == (
        None,
        None,
        2,
    )
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    unwritable = PlanChoices(blocked / "fp8-conv-plans.json")  # its folder is a file: saving fails, quietly
    unwritable.remember(key, 3)
    assert unwritable.get(key) == 3


def test_the_engine_keeps_its_plans_beside_the_compile_cache(tiny_settings: Settings) -> None:
    from imagesmith.engine import fp8_conv

    Engine.start(tiny_settings.with_changes(fp8=True, fp8_convs=True, warmup_sizes="64x64"))
    assert fp8_conv._CUDNN.choices.path == tiny_settings.data_dir / "compile-cache" / "fp8-conv-plans.json"


def test_every_kind_of_cudnn_graph_shares_one_plan_file_and_one_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagesmith.engine import cudnn_graphs

    convolutions, attention = cudnn_graphs.CudnnGraphs(), cudnn_graphs.CudnnGraphs()
    monkeypatch.setattr(cudnn_graphs, "_SHARED", [])
    cudnn_graphs.shared(convolutions), cudnn_graphs.shared(attention)
    cudnn_graphs.remember_plans_in(tmp_path)
    # One object: two on one file would each write back only their own choices, losing the other's.
    assert convolutions.choices is attention.choices
    assert convolutions.choices.path == tmp_path / "fp8-conv-plans.json"
    convolutions.choices.remember("conv shape", 6)
    attention.choices.remember("attention shape", 0)
    assert {"conv shape", "attention shape"} <= set(
        json.loads((tmp_path / "fp8-conv-plans.json").read_text())
    )
    kept = convolutions.choices
    cudnn_graphs.remember_plans_in(tmp_path)
    assert convolutions.choices is kept  # the same folder again: nothing reread, nothing lost
    convolutions.reports.append({"key": "a"})
    attention.reports.append({"key": "b"})
    assert [report["key"] for report in cudnn_graphs.plan_reports()] == ["a", "b"]
