"""A compiled call with a static graph for each warmed-up image size and one graph for every other size.

Why: dynamo remembers per code object which input sizes changed between calls. At the second image size it
compiles a graph with symbolic height and width, and from then on serves every call from that newest graph, the
warmed-up size included. Such a graph is slower. Inductor leaves the channels-last layout out of graphs whose
convolutions have symbolic shapes, so the graph pays transposes around them. The VAE decoder's 1024x1024 decode
took 47.3 ms on that graph against 35.5 ms on its static one, with 7.1 ms of layout transposes (run 82 in
docs/benchmarks.md, an H100). A service that served one 1216x832 image would have decoded every later
1024x1024 image on it.

Each route's graphs hang on a code object of its own (`entry_of_its_own`). Dynamo keeps its compiled graphs and its
limit of graphs per code object, so with the module's `forward` as every route's first frame, a call marked static
could still run a graph compiled dynamic for another route: torch 2.11 does not guard on static marks (2.13
does). Run 83 saw it: the decoder's routed 1024x1024 decode ran the other size's
dynamic graph, at 44.7 ms, and compiled nothing.

Routing by size keeps each warmed-up size on a graph compiled for it: the warm-up says which sizes those are
(`keep_static`, from engine/fast.py's warm_up). Any other size goes to one graph marked dynamic in height and
width before its first compile: one compile per kind of pass, at the any-size warm-up or (with
IMAGESMITH_COMPILE_ON_REQUEST) on the first request of such a size, and none for each size after it (sides in
multiples of 32 px, areas up to the decoder's attention bound). The price: with two
or more warm-up sizes, dynamo's own dynamic graph came out of the warm-up and served new sizes; here each
warmed-up size gets a static graph, and the shared graph needs a warm-up pass of its own, which the service runs
only when asked (IMAGESMITH_WARMUP_ANY_SIZE; fast.warm_up's `any_size`, Settings.warms_up_any_size): run 87
measured it at 3.4x a static graph's compile and +29 % a call; with channels-last weights (on by default with
compile: fast.channels_last_wanted) run 88 measured 2.35x and +26 %.

After a service's warm-up the routes stop compiling (`stop_compiling`, IMAGESMITH_COMPILE_ON_REQUEST=false, the
default): a route the warm-up never ran (the any-size graph without IMAGESMITH_WARMUP_ANY_SIZE, the batched graph
of a server warmed up at batch 1 only) runs the module uncompiled instead of compiling on a client's request. A
full-size compile takes minutes on the GPU thread, and every queued request would wait behind it; uncompiled,
the one pass is slower and nothing else waits. Inside a route that did compile, a call its graphs' guards reject
(guidance_scale <= 1: one row per image; a size the any-size graph was specialised against) runs uncompiled too:
dynamo's "fail_on_recompile" stance refuses the recompile, and the call runs the module itself. Each kind is
logged once, with dynamo's reason. (Modules compiled without routing are covered by engine/fast.py's
`no_compiling_on_requests`, silently.)
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Callable
from typing import Any

import torch

from imagesmith.uncompiled_calls import count_uncompiled_call

log = logging.getLogger(__name__)

LatentSize = tuple[int, int]  # (height, width) of the latents, the image's sides over the VAE's scale factor
HEIGHT_DIM, WIDTH_DIM = -2, -1  # of an NCHW sample
SDXL_VAE_SCALE = 8  # pixels per latent side, for the logs (the tiny model's too)


class SizeRoutedCall:
    """What `Module.compile` would install as `_compiled_call_impl`, with a graph per kind of image size.

    A sample whose latent height and width were warmed up (`keep_static`) goes to `static`, its height and width
    marked static, so each such size keeps a graph of its own. Any other goes to `any_size`, its height and width
    marked dynamic before the first compile. Both wrap the same module: the weights are shared, only the graphs
    differ. `warmed` may be shared with other routed calls (engine/batch_routing.py shares one between its two).
    """

    def __init__(
        self,
        call_impl: Callable[..., Any],
        options: dict[str, Any],
        warmed: set[LatentSize] | None = None,
        label: str = "module",
    ) -> None:
        self.options = dict(options)  # torch.compile's arguments, for the start-up's checks and tests
        self.static_entry = entry_of_its_own(call_impl, f"{label}_at_a_warmed_up_size")
        self.any_size_entry = entry_of_its_own(call_impl, f"{label}_at_any_other_size")
        self.static = torch.compile(self.static_entry, **options)
        self.any_size = torch.compile(self.any_size_entry, **options)
        self.warmed: set[LatentSize] = warmed if warmed is not None else set()
        self.label = label
        self.uncompiled = call_impl  # the module's own call: what runs where no graph was warmed up
        # The routes that ran while compiling was allowed: those have graphs. `stop_compiling` freezes the set.
        self.routes_run: set[str] = set()
        self.compiles = True
        self.any_size_failed = False  # given up: sizes not warmed up run uncompiled
        self.any_size_raised = False  # a call on the any-size graph raised (`take_any_size_raised`)

    def give_up_any_size(self) -> None:
        """From now on every size not warmed up runs the module uncompiled: its graph failed (inductor on
        symbolic shapes), and a retry on a request would fail the same way after minutes of tracing."""
        self.any_size_failed = True

    def take_any_size_raised(self) -> bool:
        """Whether a call on the any-size graph raised since the last time this was asked: the engine gives
        up only the shared graphs when the failure came from one of them (engine.py's failed-pass handling)."""
        raised, self.any_size_raised = self.any_size_raised, False
        return raised

    def stop_compiling(self) -> None:
        """From now on a route that never ran (no graph of it exists) runs the module uncompiled."""
        self.compiles = False

    def keep_static(self, size: LatentSize) -> None:
        """From now on samples of this latent size run on a static graph of their own."""
        self.warmed.add(size)

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        compiled = self.compiled_for(sample)
        try:
            return self._call(compiled, sample, *args, **kwargs)
        except Exception:
            if compiled is self.any_size:
                self.any_size_raised = True
            raise

    def _call(self, compiled: Callable[..., Any], sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.compiles or compiled is self.uncompiled:
            return compiled(sample, *args, **kwargs)
        try:
            # Dynamo checks the guards as the entry frame starts, before any of its work runs: a refused
            # recompile leaves nothing half done.
            with torch.compiler.set_stance("fail_on_recompile"):
                return compiled(sample, *args, **kwargs)
        except RuntimeError as error:
            reason = refused_recompile_reason(error)
            if reason is None:
                raise
        note_uncompiled_call(
            self.label,
            (latent_size(sample), reason),
            f"a {self.label} call at latents {shape_text(sample)} missed its graphs' guards ({reason})",
            ONLY_ON_REQUEST,
        )
        return self.uncompiled(sample, *args, **kwargs)

    def compiled_for(self, sample: torch.Tensor) -> Callable[..., Any]:
        """The compiled function for this sample, with its height and width marked for it. With no size warmed
        up (no warm-up ran: `IMAGESMITH_WARMUP=false`, a one-shot command, a benchmark's own passes), the first
        size seen counts as warmed up, as dynamo's own first graph would be static."""
        dims = (sample.dim() + HEIGHT_DIM, sample.dim() + WIDTH_DIM)
        size = latent_size(sample)
        if not self.warmed:
            self.warmed.add(size)
        route = "static" if size in self.warmed else "any size"
        if route == "any size" and self.any_size_failed:
            note_uncompiled_call(
                self.label,
                (size, "failed"),
                f"the {self.label} graph for sizes not warmed up failed in torch.compile (logged then), latents "
                f"{shape_text(sample)}",
                AFTER_A_FAILED_COMPILE,
            )
            return self.uncompiled
        if not self.compiles and route not in self.routes_run:
            what = "size" if route == "any size" else "kind of pass at a warmed-up size"
            note_uncompiled_call(
                self.label,
                (size, route),
                f"the warm-up compiled no {self.label} graph for this {what}, latents {shape_text(sample)}",
                FOR_A_NEW_SIZE if route == "any size" else ONLY_ON_REQUEST,
            )
            return self.uncompiled
        self.routes_run.add(route)
        # No tensor object goes through both routes: dynamo lets a "maybe dynamic" mark win over a static one.
        if route == "static":
            for dim in dims:
                torch._dynamo.mark_static(sample, dim)
            return self.static
        for dim in dims:
            # "maybe": a mark, not a constraint; where the model specialises a side (the decoder's attention
            # bound, a square first size) dynamo adds a guard or recompiles instead of raising.
            torch._dynamo.maybe_mark_dynamic(sample, dim)
        return self.any_size


# What was logged already: each kind once a process (the base, the refiner and the decoder each meet a new size).
_SAID_UNCOMPILED: set[tuple[Any, ...]] = set()
_REFUSED_RECOMPILE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


# What would compile such a pass, for the warning: a size the warm-up did not run can be warmed up; a pass whose
# shape no warm-up runs (one row per image with guidance_scale <= 1, a batch the warm-up's graphs do not fit) only
# compiles on its request.
FOR_A_NEW_SIZE = (
    "list the size in IMAGESMITH_WARMUP_SIZES, or set IMAGESMITH_WARMUP_ANY_SIZE=true (every size) or "
    "IMAGESMITH_COMPILE_ON_REQUEST=true"
)
ONLY_ON_REQUEST = "IMAGESMITH_COMPILE_ON_REQUEST=true compiles such passes, on their first request"
AFTER_A_FAILED_COMPILE = "list the size in IMAGESMITH_WARMUP_SIZES (a static graph of its own)"


def note_uncompiled_call(label: str, kind: tuple[Any, ...], what: str, remedy: str) -> None:
    """Count a call that runs uncompiled (/metrics, by `label`) and log its kind once a process, with `remedy`."""
    count_uncompiled_call(label)
    if (label, *kind) in _SAID_UNCOMPILED:
        return
    _SAID_UNCOMPILED.add((label, *kind))
    log.warning(
        "%s: it runs uncompiled (slower) rather than compile on a request. To compile it: %s", what, remedy
    )


def refused_recompile_reason(error: RuntimeError) -> str | None:
    """The guard that failed, when `error` is dynamo refusing a recompile under "fail_on_recompile" (torch 2.11
    and 2.13 word it alike); None for any other error."""
    message = str(error)
    if not message.startswith(_REFUSED_RECOMPILE):
        return None
    failures = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    # Each failure starts with its graph's place among the cache entries ("0/0: "), which says nothing here.
    return re.sub(r"^\d+/\d+: ", "", failures[0])[:200] if failures else "no guard named"


def shape_text(sample: torch.Tensor) -> str:
    """`rows`x`height`x`width` of the latents and the image size with SDXL's VAE, for the logs."""
    rows, (height, width) = sample.shape[0], latent_size(sample)
    return f"{height}x{width} with {rows} row(s) (a {width * SDXL_VAE_SCALE}x{height * SDXL_VAE_SCALE} image)"


def entry_of_its_own(call_impl: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A function that calls `call_impl`, with a new code object named `name`: dynamo compiles it as the first
    frame and keeps the graphs it makes there, apart from every other entry's (the module docstring says why)."""

    def entry(*args: Any, **kwargs: Any) -> Any:
        return call_impl(*args, **kwargs)

    code = entry.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, entry.__globals__, name, None, entry.__closure__)


def latent_size(sample: torch.Tensor) -> LatentSize:
    return int(sample.shape[HEIGHT_DIM]), int(sample.shape[WIDTH_DIM])


def latent_size_of_image(width: int, height: int, scale_factor: int) -> LatentSize:
    """The latents' (height, width) for an image, as diffusers' SDXL pipelines make them."""
    return height // scale_factor, width // scale_factor
