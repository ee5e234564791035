"""On a CUDA GPU: with IMAGESMITH_TIMED_REDUCTIONS (inductor's multi-kernel), a graph compiled a second time comes
from the compile cache and runs. Before engine/multi_kernel_cache.py it raised "'NoneType' object does not support
the context manager protocol" (run 95, H100): the service's second start with its cache kept would have failed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config

from imagesmith.engine.fast import use_timed_reductions
from tests.dynamo_reset import reset_dynamo

pytestmark = pytest.mark.gpu


@pytest.fixture
def own_compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh on-disk cache, so the first compile writes it and the second can only come from it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    before = inductor_config.triton.multi_kernel, inductor_config.fx_graph_cache
    inductor_config.fx_graph_cache = True
    yield
    inductor_config.triton.multi_kernel, inductor_config.fx_graph_cache = before
    reset_dynamo()


def layer_norm_then_scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # A 1280-wide layer norm, the UNet's reduction that multi-kernel compiles both ways.
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight) * 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("own_compile_cache")
def test_a_multi_kernel_graph_from_the_compile_cache_runs() -> None:
    use_timed_reductions(True)
    x = torch.randn(2, 4096, 1280, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(1280, device="cuda", dtype=torch.bfloat16)
    expected = layer_norm_then_scale(x, weight)

    first = torch.compile(layer_norm_then_scale, fullgraph=True)(x, weight)
    reset_dynamo()  # forget the compiled function, keep the files: the next compile is a cache hit
    second = torch.compile(layer_norm_then_scale, fullgraph=True)(x, weight)

    assert torch.equal(first, second)
    torch.testing.assert_close(second, expected, atol=3e-2, rtol=2e-2)
