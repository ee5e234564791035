"""The cross-attention keys-and-values prototype (benchmarks/cross_attention_kv.py), measured on the GPU by
`unet_compiled.py --variants ro,ro+kv`: before its timing can mean anything, the UNet must compute the same
numbers with it, keep the keys' and values' projection out of the compiled call, and read a new prompt's values
without compiling again."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.dynamo_reset import reset_dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cross_attention_kv
from attention_backends import unet_inputs
from sdxl_random import UNET_KEY, architecture
from unet_compiled import build_unet


def toy_unet() -> Any:
    """The benchmark's base UNet at toy sizes, QKV fused as the engine holds it."""
    return build_unet("base", "smoke", "cpu", torch.float32)


def unfused_toy_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**architecture("smoke")["base"][UNET_KEY])


def output(unet: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = unet(**inputs, return_dict=False)[0]
    return result


def another_prompt(inputs: dict[str, Any]) -> dict[str, Any]:
    return {**inputs, "encoder_hidden_states": torch.randn_like(inputs["encoder_hidden_states"])}


def test_the_unet_computes_the_same_numbers_for_each_prompt_filled() -> None:
    torch.manual_seed(1)
    reference = toy_unet()
    inputs = unet_inputs(reference, 2, 16, "cpu", torch.float32)
    unet = toy_unet()
    assert len(cross_attention_kv.install(unet)) == len(cross_attention_kv.cross_attentions(reference)) > 0
    for prompt in (inputs, another_prompt(inputs)):
        cross_attention_kv.fill(unet, prompt["encoder_hidden_states"])
        assert torch.equal(output(unet, prompt), output(reference, prompt))


def test_the_compiled_call_leaves_out_the_projection_and_reads_a_new_prompts_values() -> None:
    reset_dynamo()
    torch.manual_seed(1)
    reference = toy_unet()
    inputs = unet_inputs(reference, 2, 16, "cpu", torch.float32)
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(graph)
        return graph.forward

    def linears(graph: torch.fx.GraphModule) -> int:
        return sum(node.target is torch._C._nn.linear for node in graph.graph.nodes)

    torch.compile(reference, backend=recording_backend, fullgraph=True)(**inputs, return_dict=False)
    unet = toy_unet()
    cross_attention_kv.install(unet)
    compiled = torch.compile(unet, backend=recording_backend, fullgraph=True)
    for prompt in (inputs, another_prompt(inputs)):
        cross_attention_kv.fill(unet, prompt["encoder_hidden_states"])
        with torch.no_grad():
            result = compiled(**prompt, return_dict=False)[0]
        assert torch.equal(result, output(reference, prompt))
    # One graph for the prototype (the second prompt needed no recompile), one fused to_kv matmul fewer per
    # cross-attention than the peer's.
    assert len(graphs) == 2, len(graphs)
    assert linears(graphs[0]) - linears(graphs[1]) == len(cross_attention_kv.cross_attentions(unet))


def test_it_refuses_what_it_would_compute_differently() -> None:
    with pytest.raises(ValueError, match="fuse_qkv_projections"):
        cross_attention_kv.install(unfused_toy_unet())
    unet = toy_unet()
    cross_attention_kv.install(unet)
    inputs = unet_inputs(unet, 2, 16, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="fill"):
        output(unet, inputs)
