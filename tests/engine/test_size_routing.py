"""engine/size_routing.py: warmed-up sizes on static graphs of their own, every other size on one dynamic graph."""

from __future__ import annotations

from typing import Any

import torch

from imagesmith.engine.size_routing import SizeRoutedCall, latent_size_of_image


class TwoConvolutions(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.second = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.silu(self.first(sample)))


def routed_with_recording(module: torch.nn.Module) -> tuple[SizeRoutedCall, list[bool], list[bool]]:
    """A routed call whose graphs run as traced; per graph compiled and per graph run, whether its sizes are
    symbolic."""
    compiled: list[bool] = []
    ran: list[bool] = []

    def recording(graph: Any, example_inputs: list[Any]) -> Any:
        values = [node.meta.get("example_value") for node in graph.graph.find_nodes(op="placeholder")]
        dynamic = any(
            isinstance(size, torch.SymInt)
            for value in values
            if isinstance(value, torch.Tensor)
            for size in value.shape
        )
        compiled.append(dynamic)

        def run(*args: Any) -> Any:
            ran.append(dynamic)
            return graph.forward(*args)

        return run

    return SizeRoutedCall(module._call_impl, {"fullgraph": True, "backend": recording}), compiled, ran


def test_a_warmed_up_size_stays_on_its_static_graph_after_other_sizes() -> None:
    module = TwoConvolutions().eval()
    routed, compiled, ran = routed_with_recording(module)
    routed.keep_static((8, 8))
    sizes = [(8, 8), (6, 10), (12, 6), (10, 14), (8, 8)]
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for height, width in sizes:
                sample = torch.randn(1, 4, height, width)
                torch.testing.assert_close(routed(sample), module(sample))
    finally:
        torch._dynamo.reset()
    assert ran == [False, True, True, True, False]
    assert compiled == [False, True]  # the warmed size's graph, then one for every other size


def test_each_warmed_up_size_gets_a_static_graph_of_its_own() -> None:
    """Plain compile would make the second size's graph dynamic and move the first size onto it."""
    module = TwoConvolutions().eval()
    routed, compiled, ran = routed_with_recording(module)
    for size in [(8, 8), (6, 10)]:
        routed.keep_static(size)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for height, width in [(8, 8), (6, 10), (8, 8), (6, 10)]:
                routed(torch.randn(1, 4, height, width))
    finally:
        torch._dynamo.reset()
    assert compiled == [False, False] and ran == [False] * 4


def test_the_latents_of_an_image_size() -> None:
    assert latent_size_of_image(1216, 832, 8) == (104, 152)  # (height, width), as the pipelines make them


def test_each_route_keeps_its_graphs_on_a_code_object_of_its_own() -> None:
    """Torch 2.11 (the GPU machine's) does not guard on static marks: with one code object for both routes, a
    warmed-up size ran the dynamic graph compiled for another size (run 83). Apart, the static entry holds
    only static graphs, whatever torch's guards are."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    module = TwoConvolutions().eval()
    routed, compiled, _ = routed_with_recording(module)
    routed.keep_static((8, 8))
    assert routed.static_entry.__code__ is not routed.any_size_entry.__code__
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for height, width in [(6, 10), (12, 6), (8, 8)]:  # another size first, as in run 83
                routed(torch.randn(1, 4, height, width))
        static_graphs = len(_debug_get_cache_entry_list(routed.static_entry))
        any_size_graphs = len(_debug_get_cache_entry_list(routed.any_size_entry))
    finally:
        torch._dynamo.reset()
    assert (static_graphs, any_size_graphs) == (1, 1)
    assert compiled == [True, False]
