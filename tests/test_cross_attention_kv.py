"""The cross-attention keys-and-values prototype (benchmarks/cross_attention_kv.py), measured on the GPU by
`unet_compiled.py --variants ro,ro+kv`: before its timing can mean anything, the UNet must compute the same
numbers with it, keep the keys' and values' projection out of the compiled call, and read a new prompt's values
without compiling again."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.dynamo_reset import reset_dynamo

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True, scope="module")
def benchmark_modules() -> Iterator[None]:
    """The benchmarks folder on sys.path for this file only, and its modules forgotten after: left imported,
    they would be what another test's own load of a benchmark module (test_kernel_kinds' doctest) resolves
    its functions' module names to."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCHMARKS))
    yield
    sys.path.remove(str(BENCHMARKS))
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(BENCHMARKS)):
            del sys.modules[name]


def bench(name: str) -> ModuleType:
    """A module of the benchmarks folder (on sys.path while this file's tests run)."""
    return importlib.import_module(name)


def inputs_for(unet: Any) -> dict[str, Any]:
    """One guided image's UNet inputs at 16x16 latents."""
    inputs: dict[str, Any] = bench("attention_backends").unet_inputs(unet, 2, 16, "cpu", torch.float32)
    return inputs


def toy_unet() -> Any:
    """The benchmark's base UNet at toy sizes, QKV fused as the engine holds it."""
    return bench("unet_compiled").build_unet("base", "smoke", "cpu", torch.float32)


def unfused_toy_unet() -> Any:
    from diffusers import UNet2DConditionModel

    sdxl_random = bench("sdxl_random")
    return UNet2DConditionModel(**sdxl_random.architecture("smoke")["base"][sdxl_random.UNET_KEY])


def output(unet: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = unet(**inputs, return_dict=False)[0]
    return result


def another_prompt(inputs: dict[str, Any]) -> dict[str, Any]:
    return {**inputs, "encoder_hidden_states": torch.randn_like(inputs["encoder_hidden_states"])}


def test_the_unet_computes_the_same_numbers_for_each_prompt_filled() -> None:
    kv = bench("cross_attention_kv")
    torch.manual_seed(1)
    reference = toy_unet()
    inputs = inputs_for(reference)
    unet = toy_unet()
    assert len(kv.install(unet)) == len(kv.cross_attentions(reference)) > 0
    for prompt in (inputs, another_prompt(inputs)):
        kv.fill(unet, prompt["encoder_hidden_states"])
        assert torch.equal(output(unet, prompt), output(reference, prompt))


def test_the_compiled_call_leaves_out_the_projection_and_reads_a_new_prompts_values() -> None:
    kv = bench("cross_attention_kv")
    reset_dynamo()
    torch.manual_seed(1)
    reference = toy_unet()
    inputs = inputs_for(reference)
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(graph)
        return graph.forward

    def linears(graph: torch.fx.GraphModule) -> int:
        return sum(node.target is torch._C._nn.linear for node in graph.graph.nodes)

    torch.compile(reference, backend=recording_backend, fullgraph=True)(**inputs, return_dict=False)
    unet = toy_unet()
    kv.install(unet)
    compiled = torch.compile(unet, backend=recording_backend, fullgraph=True)
    for prompt in (inputs, another_prompt(inputs)):
        kv.fill(unet, prompt["encoder_hidden_states"])
        with torch.no_grad():
            result = compiled(**prompt, return_dict=False)[0]
        assert torch.equal(result, output(reference, prompt))
    # One graph for the prototype (the second prompt needed no recompile), one fused to_kv matmul fewer per
    # cross-attention than the peer's.
    assert len(graphs) == 2, len(graphs)
    assert linears(graphs[0]) - linears(graphs[1]) == len(kv.cross_attentions(unet))


def test_it_refuses_what_it_would_compute_differently() -> None:
    kv = bench("cross_attention_kv")
    with pytest.raises(ValueError, match="fuse_qkv_projections"):
        kv.install(unfused_toy_unet())
    unet = toy_unet()
    kv.install(unet)
    inputs = inputs_for(unet)
    with pytest.raises(RuntimeError, match="fill"):
        output(unet, inputs)
