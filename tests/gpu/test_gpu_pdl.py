"""On a Hopper GPU: with IMAGESMITH_PDL, inductor's Triton kernels wait for their predecessor on the GPU
(`gdc_wait`) and launch their dependents early, inside CUDA graphs as the UNets run them, and the results are
bit for bit those of the same graph without it: PDL changes when a kernel starts, never what it computes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._inductor.utils import run_and_get_code

from imagesmith.engine.fast import use_dependent_launches
from tests.dynamo_reset import reset_dynamo

pytestmark = pytest.mark.gpu

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture
def pdl_restored() -> Iterator[None]:
    before = inductor_config.triton.enable_pdl, inductor_config.fx_graph_cache
    inductor_config.fx_graph_cache = False  # each compile generates its kernels, so the code shows the flag
    yield
    inductor_config.triton.enable_pdl, inductor_config.fx_graph_cache = before
    reset_dynamo()


def transformer_tail(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # A chain of dependent Triton kernels as in a transformer block: residual add, layer norm, GELU, a reduction.
    hidden = torch.nn.functional.layer_norm(x + residual, (x.shape[-1],), weight)
    hidden = torch.nn.functional.gelu(hidden) * hidden.mean(dim=1, keepdim=True)
    return torch.nn.functional.layer_norm(hidden, (x.shape[-1],)) + residual


def _compiled_result(wanted: bool, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, str]:
    reset_dynamo()
    use_dependent_launches(wanted)
    compiled = torch.compile(transformer_tail, fullgraph=True, mode="reduce-overhead")
    result, code = run_and_get_code(compiled, *inputs)  # compiles: the code is this call's
    for _ in range(2):  # record, then replay: the last result comes from the CUDA graph
        result = compiled(*inputs)
    return result.clone(), "\n".join(code)


@pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of compute capability 9.0+")
@pytest.mark.usefixtures("pdl_restored")
def test_dependent_launches_change_the_kernels_not_the_results() -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    shape = (2, 4096, 640)
    inputs = (
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator),
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator),
        torch.randn(shape[-1], device="cuda", dtype=torch.bfloat16, generator=generator),
    )
    without, code_without = _compiled_result(False, inputs)
    with_pdl, code_with = _compiled_result(True, inputs)
    assert "gdc_wait" not in code_without
    assert "gdc_wait" in code_with and "gdc_launch_dependents" in code_with
    assert torch.equal(with_pdl, without)
