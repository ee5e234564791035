"""IMAGESMITH_DECODER_MATH_ATTENTION: the VAE decoder's attention written as matmuls inside the traced code for
bf16 decodes up to 128x128 latents, the fused kernel everywhere else, one graph for each side of the bound, the
same picture; on by default with compile."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)

from imagesmith.config import CompileChoice, Settings
from imagesmith.engine import Engine, fast
from imagesmith.engine import decoder_attention as module
from imagesmith.engine.decoder_attention import (
    MAX_POSITIONS,
    DecoderAttentionProcessor,
    processors_kept,
    route_decoder_attention,
    routed_blocks,
)
from imagesmith.engine.fast import apply_speed_levers, decoder_math_attention_wanted
from imagesmith.engine.hardware import DeviceInfo, plan_hardware
from tests.dynamo_reset import reset_dynamo

GPU = DeviceInfo("cuda", name="H100", capability=(9, 0), total_memory_gib=80, free_memory_gib=79)
CPU = DeviceInfo("cpu", name="cpu", capability=None, total_memory_gib=24, free_memory_gib=20)
CHANNELS = 8


def vae_attention(fused: bool) -> Attention:
    """An attention block built as diffusers' VAE mid-block builds its own (one head as wide as the channels),
    small; random weights, QKV fused as the engine's fuse_qkv lever leaves it, or not."""
    torch.manual_seed(0)
    block = Attention(
        CHANNELS,
        heads=1,
        dim_head=CHANNELS,
        rescale_output_factor=2.0,  # the VAE's is 1.0; 2.0 shows the processor divides by it
        eps=1e-6,
        norm_num_groups=4,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    if fused:
        block.fuse_projections()
        block.set_processor(FusedAttnProcessor2_0())  # what AutoencoderKL.fuse_qkv_projections does
    return block.eval()


def feature_map(height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(height * 1000 + width)
    return torch.randn(1, CHANNELS, height, width, generator=generator).to(dtype)


@pytest.mark.parametrize("fused", [False, True])
def test_eager_it_gives_diffusers_own_processors_output_exactly(fused: bool) -> None:
    block = vae_attention(fused)
    assert type(block.processor).__name__ == ("FusedAttnProcessor2_0" if fused else "AttnProcessor2_0")
    hidden = feature_map(12, 10)
    with torch.no_grad():
        theirs = block(hidden)
        block.set_processor(DecoderAttentionProcessor())
        ours = block(hidden)
    assert torch.equal(ours, theirs)  # eager, both call the same fused kernel on the same tensors


def test_eager_even_bf16_keeps_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a trace the matmuls would write the score matrix and read it back: an eager decoder (after a
    failed compile) keeps the kernel."""
    calls: list[int] = []
    fused_kernel = torch.nn.functional.scaled_dot_product_attention

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return fused_kernel(*args, **kwargs)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", counted)
    block = vae_attention(fused=True).to(torch.bfloat16)
    block.set_processor(DecoderAttentionProcessor())
    with torch.no_grad():
        block(feature_map(8, 8, torch.bfloat16))
    assert calls == [1]


def traced_graphs(
    block: Attention, sizes: list[tuple[int, int]], dtype: torch.dtype
) -> tuple[list[str], list[str]]:
    """Compile `block` as the engine compiles the decoder (fullgraph, dynamo's automatic dynamic shapes) with
    a backend that records each graph dynamo hands it, and run it at each size. Returns how each graph traced
    runs its attention ('matmuls' or 'kernel'), and which kind of graph served each size."""
    graphs: list[str] = []
    served: list[str] = []

    def recording(graph_module: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        targets = " ".join(str(node.target) for node in graph_module.graph.nodes)
        kind = "kernel" if "scaled_dot_product_attention" in targets else "matmuls"
        graphs.append(kind)

        def run(*args: Any) -> Any:
            served.append(kind)
            return graph_module.forward(*args)

        return run

    reset_dynamo()
    compiled = torch.compile(block, backend=recording, fullgraph=True)
    try:
        with torch.no_grad():
            for height, width in sizes:
                compiled(feature_map(height, width, dtype))
    finally:
        reset_dynamo()
    return graphs, served


def test_traced_in_bf16_it_is_matmuls_up_to_the_bound_and_the_kernel_past_it_one_graph_a_side() -> None:
    """The bound is a branch in the traced code, so dynamo guards on it: with many sizes the decoder compiles
    once statically (the first size), once dynamically below the bound and once above, never per size."""
    block = vae_attention(fused=True).to(torch.bfloat16)
    route_decoder_attention(block)
    assert MAX_POSITIONS == 128 * 128  # a 1024x1024 image's latents, where it was measured
    below = [(8, 6), (16, 12), (24, 20), (128, 128), (96, 40)]
    above = [(136, 128), (144, 136), (129, 128)]
    assert all(h * w <= MAX_POSITIONS for h, w in below) and all(h * w > MAX_POSITIONS for h, w in above)
    graphs, served = traced_graphs(block, below + above, torch.bfloat16)
    assert graphs == ["matmuls", "matmuls", "kernel"]
    # Each size on its own side: 128x128, the bound itself and the size measured, gets the matmuls.
    assert served == ["matmuls"] * len(below) + ["kernel"] * len(above)


def test_traced_in_fp32_or_fp16_it_keeps_the_kernel() -> None:
    """Measured in bf16 only; fp16 scores can overflow where the kernel keeps fp32, and the fp32 retry of a NaN
    decode gains nothing."""
    block = vae_attention(fused=False)
    route_decoder_attention(block)
    assert traced_graphs(block, [(8, 6)], torch.float32) == (["kernel"], ["kernel"])
    assert traced_graphs(block.to(torch.float16), [(8, 6)], torch.float16) == (["kernel"], ["kernel"])


def test_the_matmuls_give_the_kernels_attention_within_bf16_rounding() -> None:
    block = vae_attention(fused=True)
    hidden = feature_map(24, 20)
    with torch.no_grad():
        reference = block(hidden)  # fp32, the fused kernel
        block.to(torch.bfloat16)
        kernel_bf16 = block(hidden.to(torch.bfloat16)).float()
        route_decoder_attention(block)
        reset_dynamo()
        # aot_eager: the traced code (the matmul branch) run by torch's own kernels, no inductor on the CPU.
        matmuls_bf16 = torch.compile(block, backend="aot_eager", fullgraph=True)(hidden.to(torch.bfloat16))
        reset_dynamo()

    def relative_l2(a: torch.Tensor) -> float:
        return float((a.float() - reference).norm() / reference.norm())

    assert relative_l2(matmuls_bf16) < 2e-2  # bf16's rounding (2^-8 a value), run 80 measured 1.2e-2
    assert relative_l2(matmuls_bf16) < 3 * max(relative_l2(kernel_bf16), 1e-3)  # no worse than bf16 itself
    assert not torch.equal(matmuls_bf16, kernel_bf16)  # it did take the other branch


def test_routing_replaces_only_the_processors_it_stands_for(caplog: pytest.LogCaptureFixture) -> None:
    decoder = torch.nn.Module()
    decoder.plain = vae_attention(fused=False)
    decoder.fused = vae_attention(fused=True)
    decoder.other = vae_attention(fused=False)
    decoder.other.set_processor(AttnProcessor())  # not one of the two SDPA processors it copies
    decoder.cross = Attention(CHANNELS, cross_attention_dim=4, heads=1, dim_head=CHANNELS)
    assert isinstance(decoder.cross.processor, AttnProcessor2_0)
    with caplog.at_level(logging.WARNING):
        assert route_decoder_attention(decoder) == 2
    assert routed_blocks(decoder) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        # The levers applied again to the same models: the routed blocks still count (the lever's text follows).
        assert route_decoder_attention(decoder) == 2
    assert "keeps DecoderAttentionProcessor" not in caplog.text
    assert isinstance(decoder.other.processor, AttnProcessor) and isinstance(
        decoder.cross.processor, AttnProcessor2_0
    )
    assert "decoder attention other keeps AttnProcessor" in caplog.text


def test_the_processor_refuses_what_it_does_not_compute() -> None:
    block = vae_attention(fused=False)
    block.set_processor(DecoderAttentionProcessor())
    hidden = feature_map(4, 4)
    with pytest.raises(ValueError, match="without a mask"):
        DecoderAttentionProcessor()(block, hidden, attention_mask=torch.ones(1, 16, 16))


@pytest.mark.parametrize(
    ("device", "compile", "asked", "wanted"),
    [
        (GPU, CompileChoice.REDUCE_OVERHEAD, None, True),  # on by default
        (GPU, CompileChoice.REDUCE_OVERHEAD, False, False),  # IMAGESMITH_DECODER_MATH_ATTENTION=false
        (GPU, CompileChoice.OFF, True, False),  # only with the decoder compiled
        (
            CPU,
            CompileChoice.DEFAULT,
            None,
            False,
        ),  # the CPU's plan decodes in fp32: the kernel, no lever named
    ],
)
def test_it_is_on_with_compile_unless_turned_off(
    device: DeviceInfo, compile: CompileChoice, asked: bool | None, wanted: bool
) -> None:
    settings = Settings(compile=compile, **({} if asked is None else {"decoder_math_attention": asked}))
    assert decoder_math_attention_wanted(settings, plan_hardware(device, settings)) is wanted


@pytest.mark.parametrize("asked", [True, False])
def test_compiling_routes_the_decoders_attention_and_names_the_lever(
    tiny_settings: Settings, asked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine.start(tiny_settings)
    decoder = engine.models.base.vae.decoder
    monkeypatch.setattr(fast, "use_persistent_compile_cache", lambda cache: cache)  # no process-wide cache
    # fuse_qkv off: the levers are applied twice below, and the fusion only once.
    settings = tiny_settings.with_changes(
        compile=CompileChoice.DEFAULT, decoder_math_attention=asked, fuse_qkv=False
    )
    fp32_levers = apply_speed_levers(engine.models.base, engine.models.refiner, engine.plan, settings)
    assert routed_blocks(decoder) == 0  # the CPU's plan decodes in fp32, where the kernel runs anyway
    assert not any("attention as matmuls" in lever for lever in fp32_levers)
    # A GPU's plan, whose VAE decodes in bf16.
    bf16_plan = dataclasses.replace(engine.plan, vae_dtype_name="bf16")
    try:
        levers = apply_speed_levers(engine.models.base, engine.models.refiner, bf16_plan, settings)
        options = decoder._compiled_call_impl.options
    finally:
        for module in fast.compiled_modules(engine):
            module._compiled_call_impl = None
    assert routed_blocks(decoder) == (1 if asked else 0)  # the tiny VAE's one mid-block attention
    # No `dynamic` option: the size routing marks the sides, and the bound is guarded in the traced code.
    assert options == {"fullgraph": True, "mode": None}
    compile_lever = next(lever for lever in levers if lever.startswith("torch.compile"))
    # In the compile lever's text, so a fall back to eager (which drops that lever) drops it too.
    assert ("attention as matmuls" in compile_lever) is asked


def test_processors_kept_gives_each_block_its_processor_back_even_after_a_failure() -> None:
    decoder = torch.nn.Module()
    decoder.plain = vae_attention(fused=False)
    decoder.fused = vae_attention(fused=True)
    before = [decoder.plain.processor, decoder.fused.processor]
    with pytest.raises(RuntimeError, match="boom"), processors_kept(decoder) as blocks:
        assert blocks == [decoder.plain, decoder.fused]
        assert route_decoder_attention(decoder) == 2 and routed_blocks(decoder) == 2
        raise RuntimeError("boom")
    assert [decoder.plain.processor, decoder.fused.processor] == before and routed_blocks(decoder) == 0
