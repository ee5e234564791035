"""On a CUDA GPU: every memory plan generates (the tiny model, so it runs in seconds). Skipped without CUDA.

Run on the device machine with `pytest -m gpu tests/gpu`. These caught the offload decode-device bug that no
CPU test can see: with CPU offload the VAE's weights rest on the CPU between uses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.schemas import GenerationRequest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("offload", ["none", "model", "sequential"])
@pytest.mark.parametrize("mode", ["ensemble", "img2img", "none"])
def test_every_offload_plan_generates(tiny_settings: Settings, offload: str, mode: str) -> None:
    engine = Engine.start(
        tiny_settings.with_changes(**{"device": "cuda", "offload": offload, "fuse_qkv": True})
    )
    assert engine.plan.dtype_name == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")
    result = engine.generate(
        GenerationRequest(
            prompt="x", width=128, height=128, num_inference_steps=10, refine_mode=mode, seed=1, num_images=2
        )
    )
    assert [image.size for image in result.images] == [(128, 128)] * 2
    assert all(np.asarray(image).std() > 0 for image in result.images)
    assert result.metadata.refined is (mode != "none")


def test_compiled_engine_matches_eager_within_bf16(tiny_settings: Settings) -> None:
    request = GenerationRequest(prompt="x", width=128, height=128, num_inference_steps=10, seed=4)
    eager = Engine.start(tiny_settings.with_changes(**{"device": "cuda"}))
    compiled = Engine.start(tiny_settings.with_changes(**{"device": "cuda", "compile": "default"}))
    a = np.asarray(eager.generate(request).images[0]).astype(float)
    b = np.asarray(compiled.generate(request).images[0]).astype(float)
    psnr = 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12))
    assert psnr > 30, psnr
