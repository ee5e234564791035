"""IMAGESMITH_COMPILE_REGIONS: each kind of transformer block compiled once, with the same arithmetic."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from dynamo_reset import reset_dynamo
from pydantic import ValidationError
from unet_call import unet_inputs

from imagesmith.config import Settings
from imagesmith.engine import Engine
from imagesmith.engine.batch_routing import BatchRoutedCall
from imagesmith.engine.compile_regions import compile_transformer_blocks_once, regions_supported

# torch 2.8 and later (pyproject allows older); the engine skips the lever there, with a warning.
needs_regions = pytest.mark.skipif(not regions_supported(), reason="this torch has no nested compile regions")
_TORCH_AT_LEAST_2_13 = torch.__version__ >= (2, 13)  # torch's TorchVersion compares with tuples


def _region_calls(graph: torch.fx.GraphModule) -> list[str]:
    """The subgraph each nested-region call in dynamo's graph runs, by the identifier torch reuses it under."""
    return [
        str(node.args[1])
        for node in graph.graph.nodes
        if node.op == "call_function" and "invoke_subgraph" in str(node.target)
    ]


@pytest.fixture
def fresh_unet(tiny_settings: Settings) -> Any:
    reset_dynamo()  # dynamo's memory of sizes and graphs is per code object, across instances
    yield Engine.start(tiny_settings.with_changes(warmup=False)).models.base.unet
    reset_dynamo()


@needs_regions
def test_every_block_reuses_one_traced_subgraph_in_both_graphs_with_the_same_outputs(fresh_unet: Any) -> None:
    """The routed UNet (the engine's compile): the one-image graph and the batch-dynamic graph each call the
    tiny UNet's four transformer blocks (one kind: 64 channels) as one shared subgraph, and each gives what
    the eager UNet gives."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(graph)
        return graph.forward

    assert compile_transformer_blocks_once(fresh_unet) == 4
    routed = BatchRoutedCall(fresh_unet._call_impl, {"fullgraph": True, "dynamic": None, "backend": backend})
    with torch.no_grad():
        for rows in (2, 6):  # one image with guidance, then a batch of three
            args, kwargs = unet_inputs(fresh_unet.config, rows)
            compiled = routed(*args, **kwargs)[0]
            eager = fresh_unet(*args, **kwargs)[0]
            assert torch.equal(compiled, eager)
    assert len(graphs) == 2
    one_image, batched = (_region_calls(graph) for graph in graphs)
    assert len(one_image) == 4 and len(set(one_image)) == 1
    # In the batch-dynamic graph the text's rows and the latents' rows start as two symbols. torch 2.13 knows
    # they are equal before the first block; torch 2.11 (the GPU machine's) learns it inside the first block, so
    # that block traces a subgraph of its own (one more input: the text's rows) and the other three share one.
    assert len(batched) == 4 and len(set(batched[1:])) == 1
    assert len(set(batched)) <= (1 if _TORCH_AT_LEAST_2_13 else 2)


@needs_regions
def test_regions_compile_for_the_base_the_refiner_and_a_second_size(tiny_settings: Settings) -> None:
    """The base and the refiner share one code object, so dynamo made the sizes that differ between them (the
    prompt embeddings' width, the ids' count) symbolic in every graph after the base's first, and torch cannot
    reuse a region across those (a KeyError inside dynamo: the engine served eager from the second UNet's first
    call). With them kept static, only a second image size makes anything symbolic: the latents' height and
    width."""
    reset_dynamo()
    engine = Engine.start(tiny_settings.with_changes(warmup=False))
    symbolic: list[tuple[int, ...]] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        for node in graph.graph.find_nodes(op="placeholder"):
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and any(
                isinstance(size, torch.SymInt) for size in value.shape
            ):
                symbolic.append(tuple(value.shape))
        assert len(set(_region_calls(graph))) >= 1
        return graph.forward

    unets = {"base": engine.models.base.unet, "refiner": engine.models.refiner.unet}
    try:
        for unet in unets.values():
            compile_transformer_blocks_once(unet)
            unet._compiled_call_impl = BatchRoutedCall(
                unet._call_impl, {"fullgraph": True, "dynamic": None, "backend": backend}
            )
        with torch.no_grad():
            for name, side in (("base", 16), ("refiner", 16), ("base", 24)):
                ids = 5 if name == "refiner" else 6
                args, kwargs = unet_inputs(unets[name].config, 2, side, ids)
                compiled = unets[name](*args, **kwargs)[0]
                unets[name]._compiled_call_impl, routed = None, unets[name]._compiled_call_impl
                assert torch.equal(compiled, unets[name](*args, **kwargs)[0])
                unets[name]._compiled_call_impl = routed
    finally:
        for unet in unets.values():
            unet._compiled_call_impl = None
        reset_dynamo()
    assert symbolic and all(len(shape) == 4 for shape in symbolic), symbolic


def test_regions_with_every_size_dynamic_are_refused_naming_both_settings() -> None:
    with pytest.raises(
        ValidationError, match=r"COMPILE_REGIONS=true cannot be combined with .*COMPILE_DYNAMIC"
    ):
        Settings(compile="default", compile_dynamic=True, compile_regions=True)


@needs_regions
def test_inductors_compiled_regions_compute_what_eager_does(fresh_unet: Any) -> None:
    """Through inductor, as the service compiles: the regions change what is compiled, not the result."""
    args, kwargs = unet_inputs(fresh_unet.config, 2)
    with torch.no_grad():
        eager = fresh_unet(*args, **kwargs)[0]
        compile_transformer_blocks_once(fresh_unet)
        compiled = torch.compile(fresh_unet, fullgraph=True)(*args, **kwargs)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@needs_regions
def test_the_setting_marks_the_unets_blocks_and_names_them_in_the_compile_lever(
    tiny_settings: Settings,
) -> None:
    engine = Engine.start(tiny_settings.with_changes(compile="default", compile_regions=True, warmup=False))
    marked = [
        type(module).__name__
        for unet in (engine.models.base.unet, engine.models.refiner.unet)
        for module in unet.modules()
        if type(module).__name__.endswith("TransformerBlock")
    ]
    assert marked == ["RegionTransformerBlock"] * 8
    lever = (
        "torch.compile(mode=default, 8 transformer blocks as regions, timed reductions) UNets + VAE decoder"
    )
    assert lever in engine.levers


def test_regions_without_compile_are_skipped_with_a_warning(
    tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="imagesmith.engine.fast"):
        engine = Engine.start(tiny_settings.with_changes(compile_regions=True, warmup=False))
    assert not any(
        type(module).__name__ == "RegionTransformerBlock" for module in engine.models.base.unet.modules()
    )
    assert "compile_regions skipped" in caplog.text


@needs_regions
def test_a_marked_unet_pickles_and_keeps_its_regions(fresh_unet: Any) -> None:
    import pickle

    compile_transformer_blocks_once(fresh_unet)
    copy = pickle.loads(pickle.dumps(fresh_unet))
    kinds = [
        type(module).__name__
        for module in copy.modules()
        if type(module).__name__.endswith("TransformerBlock")
    ]
    assert kinds == ["RegionTransformerBlock"] * 4
