"""A compiled UNet with two graphs: a static one for one image's pass, one dynamic in the batch for the rest.

Why: with plain `Module.compile`, dynamo compiles the first pass (one image) for its exact shape, then, at the
first batched pass, again with the batch dimension symbolic, and from then on serves every pass (one image
included) from that newest, batch-dynamic graph. Its generic-size kernels are slower at one image: the
service's base stage took 1.12-1.18 s per image after its batch-8 warm-up against 1.06 s for the same pass on
a static graph (run 29 in docs/benchmarks.md). Routing by rows keeps each graph for the passes it was made
for, with as many compiles as before: the one-image graph is the first one dynamo would make anyway, and the
batched graph the recompile it would make at the first batch.

Each of the two also routes by image size (engine/size_routing.py): a warmed-up size keeps static graphs, any
other size runs on graphs dynamic in height and width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from imagesmith.engine.size_routing import LatentSize, SizeRoutedCall

# Rows of one image's UNet pass: two with classifier-free guidance (the negative and the positive prompt).
ONE_IMAGE_ROWS = 2


class BatchRoutedCall:
    """What `Module.compile` would install as `_compiled_call_impl`, with a graph per kind of pass.

    A pass of at most ONE_IMAGE_ROWS rows goes to `single` (its batch dimension marked static); a larger one
    goes to `batched`, with the batch dimension of its inputs marked dynamic before the first compile, so it
    compiles once for every batch size instead of once for the first and again for the second. Both wrap the
    same module: the weights are shared, only the graphs differ. Each routes by image size as well, with one set
    of warmed-up sizes for both.
    """

    def __init__(self, call_impl: Callable[..., Any], options: dict[str, Any]) -> None:
        warmed: set[LatentSize] = set()
        # Each with code objects of its own (engine/size_routing.py), so neither runs the other's graphs.
        self.single = SizeRoutedCall(call_impl, options, warmed, "one_image")
        self.batched = SizeRoutedCall(call_impl, options, warmed, "batched")
        self.warmed = warmed

    def keep_static(self, size: LatentSize) -> None:
        """From now on passes at this latent size run on graphs static in height and width."""
        self.warmed.add(size)

    def stop_compiling(self) -> None:
        """From now on a kind of pass the warm-up never ran runs uncompiled (engine/size_routing.py)."""
        for call in (self.single, self.batched):
            call.stop_compiling()

    def give_up_any_size(self) -> None:
        """From now on passes at sizes not warmed up run uncompiled (engine/size_routing.py)."""
        for call in (self.single, self.batched):
            call.give_up_any_size()

    def take_any_size_raised(self) -> bool:
        """Whether a call on either route's any-size graph raised since last asked (engine/size_routing.py)."""
        return any([call.take_any_size_raised() for call in (self.single, self.batched)])  # both cleared

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _timestep_as_float32(args, kwargs)
        _mark_model_sizes_static(kwargs)
        if sample.shape[0] <= ONE_IMAGE_ROWS:
            # Static in the batch only: dynamo's record of sizes seen is kept by function name and file, so
            # after a batched pass it could compile this one dynamic in the batch too. Not dynamic=False: then
            # every image size would be a graph of its own (the size routing keeps that for warmed-up sizes).
            for tensor in _batched_inputs(sample, kwargs):
                torch._dynamo.mark_static(tensor, 0)
            return self.single(sample, *args, **kwargs)
        for tensor in _batched_inputs(sample, kwargs):
            # "maybe": a mark, not a constraint; if the model specialises the batch, dynamo recompiles
            # instead of raising.
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self.batched(sample, *args, **kwargs)


def _timestep_as_float32(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The UNet's timestep as float32, whatever the scheduler hands it.

    Euler hands float32 timesteps; DPM++ 2M, DDIM and UniPC hand int64 ones. A graph is guarded on its inputs'
    dtypes, so the warm-up's graphs (Euler) did not fit those schedulers' passes: they compiled graphs of their own on
    a request, or ran uncompiled once the service stops compiling (fast.stop_compiling_on_requests). The cast
    changes no result: the UNet's time embedding starts with `timesteps.float()` (diffusers'
    get_timestep_embedding), and float32 holds every integer timestep (0-999) exactly."""
    if args:
        timestep = args[0]
        if isinstance(timestep, torch.Tensor) and timestep.dtype != torch.float32:
            return (timestep.float(), *args[1:]), kwargs
        return args, kwargs
    timestep = kwargs.get("timestep")
    if isinstance(timestep, torch.Tensor) and timestep.dtype != torch.float32:
        return args, {**kwargs, "timestep": timestep.float()}
    return args, kwargs


def _mark_model_sizes_static(kwargs: dict[str, Any]) -> None:
    """Keep the sizes a model fixes (77 tokens, the text encoders' widths, the number of size/crop ids) static.

    The base and the refiner run one function (UNet2DConditionModel.forward, entered through entries of the same
    names, engine/size_routing.py), and dynamo remembers per function which input sizes changed between calls:
    at the refiner's first call the prompt embeddings' width
    (2048 -> 1280) and the ids' count (6 -> 5) differ from the base's, so dynamo compiled the refiner's graph,
    and every later graph of either UNet, with those sizes symbolic (seen on the tiny model). That was never
    meant, and torch cannot reuse a nested compile region (engine/compile_regions.py) across such sizes (a
    KeyError in dynamo, torch 2.13). Marked static, each UNet's graph keeps its own fixed sizes; the batch and
    the image size still go symbolic where the routing and a second size make them."""
    tensors = [kwargs.get("encoder_hidden_states"), *(kwargs.get("added_cond_kwargs") or {}).values()]
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            for dim in range(1, tensor.dim()):
                torch._dynamo.mark_static(tensor, dim)


def _batched_inputs(sample: torch.Tensor, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The UNet inputs with one row per image row: the latents, the prompt embeddings, SDXL's added
    conditions (pooled text embeddings and size/crop ids). Marking only some would leave the rest static,
    and dynamo would recompile at the second batch size for them."""
    rows = sample.shape[0]
    candidates = [sample, kwargs.get("encoder_hidden_states")]
    candidates += list((kwargs.get("added_cond_kwargs") or {}).values())
    return [
        tensor
        for tensor in candidates
        if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.shape[0] == rows
    ]
