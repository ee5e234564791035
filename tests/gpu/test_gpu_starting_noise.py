"""On a CUDA GPU: the engine's starting noise, uploaded from its pinned buffer without a sync, is diffusers'
noise bit for bit, and a later draw into the same buffer leaves the earlier upload as it was."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from imagesmith.engine.engine import generators_for
from imagesmith.engine.starting_noise import StartingNoise

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_uploaded_noise_is_diffusers_noise_and_survives_the_next_draw() -> None:
    noise = StartingNoise()
    shape = (4, 128, 128)
    first = noise.latents(generators_for([1, 2, 3, 4]), shape, torch.bfloat16, "cuda")
    second = noise.latents(generators_for([5, 6, 7, 8]), shape, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    for seeds, made in (([1, 2, 3, 4], first), ([5, 6, 7, 8], second)):
        expected = randn_tensor(
            (4, *shape), generator=generators_for(seeds), device=torch.device("cuda"), dtype=torch.bfloat16
        )
        assert made.device.type == "cuda"
        assert torch.equal(made, expected), seeds
