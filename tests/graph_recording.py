"""A torch.compile backend for tests that runs each graph as dynamo traced it (no inductor: seconds on a CPU) and
records, per graph compiled and per graph run, whether its tensor inputs have symbolic sizes; a small
convolutional module to route through it; and the tiny engine's modules routed as the service compiles them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from dynamo_reset import reset_dynamo


@dataclass
class GraphRecording:
    compiled: list[bool] = field(default_factory=list)  # per graph compiled: whether its sizes are symbolic
    ran: list[bool] = field(default_factory=list)  # per graph run: the same
    # Fail to compile graphs whose image sides are symbolic, as inductor might on a torch version or card.
    fails_on_symbolic_sides: bool = False

    def backend(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        # Dynamo's fake example values carry symbolic sizes where the graph is dynamic.
        values = [node.meta.get("example_value") for node in graph.graph.find_nodes(op="placeholder")]
        shapes = [value.shape for value in values if isinstance(value, torch.Tensor)]
        dynamic = any(isinstance(size, torch.SymInt) for shape in shapes for size in shape)
        # Image sides: the last two of a 4-d (NCHW) input's sizes.
        sides_dynamic = any(
            isinstance(size, torch.SymInt) for shape in shapes if len(shape) == 4 for size in shape[-2:]
        )
        if self.fails_on_symbolic_sides and sides_dynamic:
            raise RuntimeError("no kernel for symbolic image sides (simulated)")
        self.compiled.append(dynamic)

        def run(*args: Any) -> Any:
            self.ran.append(dynamic)
            return graph.forward(*args)

        return run


class TwoConvolutions(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.second = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.silu(self.first(sample)))


@contextmanager
def engine_routed_and_recording(engine: Any) -> Iterator[GraphRecording]:
    """The engine's UNets and VAE decoder compiled with the service's routing (engine/batch_routing.py,
    engine/size_routing.py), through a backend that runs each graph as traced and records each graph compiled and
    each graph run. Afterwards the modules are eager again and dynamo's caches are empty."""
    from imagesmith.engine.batch_routing import BatchRoutedCall
    from imagesmith.engine.fast import route_decoder

    recording = GraphRecording()
    options = {"fullgraph": True, "dynamic": None, "backend": recording.backend}
    unets = [engine.models.base.unet, engine.models.refiner.unet]
    decoder = engine.models.base.vae.decoder
    reset_dynamo()
    try:
        for unet in unets:
            unet._compiled_call_impl = BatchRoutedCall(unet._call_impl, options)
        route_decoder(decoder, options)
        yield recording
    finally:
        for module in [*unets, decoder]:
            module._compiled_call_impl = None
        reset_dynamo()
