"""IMAGESMITH_EMPTY_NEGATIVE_SHORTCUT (engine/empty_negative.py): with no negative prompt the base's
cross-attentions run for the guided rows only and give the image the full computation gives; with one, or
unguided, the blocks run as before; compiled, the warm-up compiles both kinds of pass, so no request compiles."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from graph_recording import engine_routed_and_recording

from imagesmith.config import Settings
from imagesmith.engine import Engine, empty_negative
from imagesmith.schemas import GenerationRequest
from imagesmith.uncompiled_calls import uncompiled_calls


def _request(negative: str = "", guidance: float = 5.0) -> GenerationRequest:
    return GenerationRequest(
        prompt="a lighthouse",
        negative_prompt=negative,
        guidance_scale=guidance,
        width=64,
        height=64,
        num_inference_steps=6,
        seed=9,
    )


def _pixels(engine: Engine, request: GenerationRequest) -> np.ndarray:
    return np.asarray(engine.generate(request).images[0], dtype=np.int16)


def _rows_seen(engine: Engine) -> list[int]:
    """Records the batch each wrapped block's own processor is handed."""
    seen: list[int] = []
    for block in empty_negative.cross_attentions(engine.models.base.unet):
        inner = block.processor.inner

        def counted(*args: Any, inner: Any = inner, **kwargs: Any) -> Any:
            seen.append(args[1].shape[0])
            return inner(*args, **kwargs)

        block.processor.inner = counted
    return seen


def test_the_same_images_with_the_guided_rows_alone(tiny_settings: Settings) -> None:
    plain = Engine.start(tiny_settings.with_changes(empty_negative_shortcut=False))
    shortcut = Engine.start(tiny_settings)  # on by default
    assert not any("guided rows only" in lever for lever in plain.levers)
    assert any("guided rows only" in lever for lever in shortcut.levers)
    assert (
        empty_negative.switch_of(shortcut.models.refiner.unet) is None
    )  # its empty negative is encoded text
    rows = _rows_seen(shortcut)

    # No negative prompt: the base's unguided rows are zeros, so only the guided row is computed.
    assert np.abs(_pixels(shortcut, _request()) - _pixels(plain, _request())).max() <= 1
    assert rows and set(rows) == {1}

    # A negative prompt, or no guidance: the blocks as before, the same image bit for bit.
    for request in (_request("blurry"), _request(guidance=1.0)):
        rows.clear()
        np.testing.assert_array_equal(_pixels(shortcut, request), _pixels(plain, request))
        assert set(rows) == ({2} if request.negative_prompt else {1})


def test_a_unet_where_it_would_not_be_exact_is_refused() -> None:
    from diffusers.models.attention_processor import Attention

    unet = _one_block(Attention(query_dim=8, cross_attention_dim=4, heads=2, dim_head=4, bias=True))
    with pytest.raises(ValueError, match="key and value projections have a bias"):
        empty_negative.install(unet)
    assert empty_negative.switch_of(unet) is None


def _one_block(attention: Any) -> Any:
    import torch

    unet = torch.nn.Module()
    unet.block = torch.nn.Module()
    unet.block.attn2 = attention
    return unet


def test_the_warm_up_compiles_both_kinds_of_pass_and_no_request_compiles(tiny_settings: Settings) -> None:
    from imagesmith.engine.fast import stop_compiling_on_requests, warm_up

    engine = Engine.start(tiny_settings.with_changes(fuse_qkv=False, empty_negative_shortcut=True))
    heard: list[str] = []
    with engine_routed_and_recording(engine) as recording:
        warm_up(engine, [(64, 64)], [1], heard.append)
        after_warm_up = len(recording.compiled)
        stop_compiling_on_requests(engine)
        calls_before = uncompiled_calls()
        for request in (_request(), _request("blurry"), _request()):
            engine.generate(request)
        new_graphs = len(recording.compiled) - after_warm_up
        calls = {kind: n - calls_before.get(kind, 0) for kind, n in uncompiled_calls().items()}
    # Without the second warm-up pass, the request with a negative prompt missed the graphs' guard on the switch.
    assert new_graphs == 0, "a request compiled"
    assert not {kind: n for kind, n in calls.items() if n}, calls  # and none ran uncompiled
    assert any(line.endswith("batch 1, a negative prompt): starting") for line in heard), heard


def test_installing_twice_wraps_once(tiny_settings: Settings) -> None:
    engine = Engine.start(tiny_settings.with_changes(empty_negative_shortcut=False))
    unet = engine.models.base.unet
    switch = empty_negative.install(unet)
    assert empty_negative.install(unet) is switch
    for block in empty_negative.cross_attentions(unet):
        assert not isinstance(block.processor.inner, empty_negative.GuidedRowsCrossAttention)
