"""The text encoders replayed as CUDA graphs: the same kernels as eager, without their launch cost.

Eager and launch-bound, CLIP-L and OpenCLIP-bigG take ~45 ms of host time per new prompt (12 and 32 layers of
small kernels at one row of 77 tokens) for 1-5 ms of GPU work: 3 % of a compiled 1.38 s image, 6 % of the
queue's throughput with new prompts (docs/benchmarks.md, run 40). The prompt cache (engine/prompt_cache.py)
encodes one text at a time, so every call has the same shape, [1, 77]: one graph per encoder serves them all.

Why a recorded graph and not torch.compile: the graph replays the very kernels eager runs, so the embeddings
(and the images) are bit for bit what eager gives, nothing compiles at start-up, and recording takes a
fraction of a second. Inductor would fuse, round differently and add minutes of compile.

How: `install` replaces the module's `forward` with a GraphedForward. The module stays the same object (the
prompt cache and the refiner compare encoders by identity) and its hooks still run. A call shaped like the
prompt cache's (token ids on a CUDA device, the recorded shape, the recorded keyword arguments, no autograd)
copies its ids into the graph's input and replays; its outputs are copied out, because the next replay
overwrites the graph's. Any other call runs the module's own forward. The first such call records the graph;
if recording fails (an op that synchronises with the host, an unsupported kernel), the encoder runs eager from
then on and says why in the log, and the service keeps serving.

Recorded at the warm-up's first encoding (on the GPU thread, where every generation runs), so not on a request.
Needs the weights resident: with offload, hooks move them between devices and a graph would keep stale
addresses (engine/fast.py refuses it there).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Eager runs before recording: cuBLAS creates its handle and workspace on first use, which a capture forbids.
_WARM_RUNS = 2


class GraphedForward:
    """Stands in for one encoder's forward (see the module's docstring)."""

    def __init__(self, module: torch.nn.Module, eager_forward: Any) -> None:
        self.module = module
        self.eager_forward = eager_forward
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_ids: torch.Tensor | None = None
        self.static_output: Any = None
        self.recorded_kwargs: dict[str, Any] | None = None
        self.failure: str | None = None
        self.replays = 0
        self.paused = False  # eager while set, the graph kept (a benchmark's A/B on one warm engine)

    def __call__(self, input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not self.replayable(input_ids, args, kwargs):
            return self.eager_forward(input_ids, *args, **kwargs)
        if self.graph is None:
            try:
                self.record(input_ids, kwargs)
            except Exception as error:  # any failure means eager, never a failed request
                self.give_up(error)
                return self.eager_forward(input_ids, *args, **kwargs)
        assert self.static_ids is not None
        self.static_ids.copy_(input_ids)
        assert self.graph is not None
        self.graph.replay()
        self.replays += 1
        return copied(self.static_output)

    def replayable(self, input_ids: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call is one the graph can stand for: nothing else changes what the kernels compute."""
        if self.paused or self.failure is not None or args or torch.is_grad_enabled():
            return False
        if torch.is_inference_mode_enabled():
            return False  # (inference tensors made while recording could not be written to outside it)
        if not isinstance(input_ids, torch.Tensor) or input_ids.device.type != "cuda":
            return False
        if any(isinstance(value, torch.Tensor) for value in kwargs.values()):
            return False  # an attention mask, say: the graph would keep the recorded one
        if torch.cuda.is_current_stream_capturing():  # inside someone else's capture: leave it alone
            return False
        if self.static_ids is None:
            # The prompt cache's shape: one row. Anything else (a caller batching rows) stays eager.
            return input_ids.dim() == 2 and input_ids.shape[0] == 1
        return (
            input_ids.shape == self.static_ids.shape
            and input_ids.dtype == self.static_ids.dtype
            and input_ids.device == self.static_ids.device
            and kwargs == self.recorded_kwargs
        )

    def record(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
        static_ids = input_ids.clone()
        side = torch.cuda.Stream(device=input_ids.device)
        side.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(side):
            for _ in range(_WARM_RUNS):
                self.eager_forward(static_ids, **kwargs)
        torch.cuda.current_stream(input_ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA call (none is expected: generations run on one thread) neither
        # fails this capture nor is captured into it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = self.eager_forward(static_ids, **kwargs)
        self.graph, self.static_ids, self.static_output = graph, static_ids, output
        self.recorded_kwargs = dict(kwargs)
        log.info(
            "%s: CUDA graph recorded for token ids %s", type(self.module).__name__, tuple(static_ids.shape)
        )

    def give_up(self, error: BaseException) -> None:
        self.failure = f"{type(error).__name__}: {error}"
        self.graph = self.static_ids = self.static_output = None
        log.warning(
            "%s: recording its CUDA graph failed, it runs eager from now on: %s",
            type(self.module).__name__,
            self.failure,
        )


def copied(output: Any) -> Any:
    """A copy of a forward's output (a transformers ModelOutput, a tuple, a tensor) in fresh memory."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(copied(item) for item in output)
    if isinstance(output, dict):  # ModelOutput is an OrderedDict of its set fields
        return type(output)(**{key: copied(value) for key, value in output.items()})
    return output


_ENCODERS = ("text_encoder", "text_encoder_2")


def text_encoders(*pipelines: Any) -> list[torch.nn.Module]:
    """The pipelines' text encoders, each module once: the refiner's text_encoder_2 is the base's (models.py
    loads it around it), so it gets one graph, and one entry in what is reported about them."""
    modules = [getattr(pipe, name, None) for pipe in pipelines if pipe is not None for name in _ENCODERS]
    return list({id(module): module for module in modules if module is not None}.values())


def install(module: torch.nn.Module) -> GraphedForward:
    """Replay `module` as a CUDA graph from its next one-row call on (once: installing twice returns the first)."""
    current = module.forward
    if isinstance(current, GraphedForward):
        return current
    graphed = GraphedForward(module, current)
    module.forward = graphed  # an instance attribute: nn.Module.__call__ finds it
    return graphed


def installed(module: Any) -> GraphedForward | None:
    forward = getattr(module, "forward", None)
    return forward if isinstance(forward, GraphedForward) else None
