"""Compile each kind of transformer block once instead of once per block (IMAGESMITH_COMPILE_REGIONS).

SDXL's base UNet holds 70 transformer blocks of two kinds (10 at 640 channels, 60 at 1280), the refiner's of two
others. torch.compile inlines the whole UNet into one graph, so dynamo traces every block and inductor lowers
and compiles every block's kernels again, 70 times over. Marked as a nested compile region
(`torch.compiler.nested_compile_region`, "hierarchical compilation"), a block is traced and compiled on its first
call and the result reused for every later block with the same kind of inputs: the UNet stays one full graph
(one CUDA graph with `reduce-overhead`), each block a call into a shared subgraph with its own weights.

Measured (docs/benchmarks.md, session 25 and runs 74-75), full-size base UNet in bf16: on an H200 the cold
compile 122.6 -> 78.4 s, the call +0.5 ms (33.56 -> 33.85 ms, ~1.5 % of an ensemble image: the fusion lost at the
blocks' boundaries); on this project's 2-core CPU the cold compile 134.9 -> 41.1 s, a restart's 18.6 -> 14.1 s.
So it is opt-in: for servers that start often, not for long-running ones.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Distinct kinds of inputs a region may be compiled for within one graph before torch raises (its default, 8).
# The base UNet needs 2 per graph and the refiner 3 (its 1536-channel blocks run at two resolutions); kept well
# above, since past it the compile fails and the engine falls back to eager for good.
REGION_KINDS_ALLOWED = 32


def regions_supported() -> bool:
    """torch 2.8 and later have nested compile regions."""
    return hasattr(torch.compiler, "nested_compile_region")


@functools.cache
def _region_block_class() -> type:
    """diffusers' transformer block with its forward marked as a nested compile region.

    A subclass set on each instance, not a replacement of diffusers' class, so that only this engine's UNets
    change: a peer pipeline in the same process (the benchmarks') keeps inlining its blocks. (torch does note
    the region's settings as attributes on diffusers' forward function, which nothing reads outside a marked
    call.) One class for every instance, as the reuse is keyed by the forward's code. Built on first use, as
    importing diffusers takes seconds; the module's __getattr__ finds it by name, so a marked UNet pickles."""
    from diffusers.models.attention import BasicTransformerBlock

    mark = torch.compiler.nested_compile_region
    if "max_reuse_entries" in inspect.signature(mark).parameters:
        region_forward = mark(BasicTransformerBlock.forward, max_reuse_entries=REGION_KINDS_ALLOWED)
    else:  # older torch: no per-region limit to raise
        region_forward = mark(BasicTransformerBlock.forward)

    class RegionTransformerBlock(BasicTransformerBlock):
        forward = region_forward

    RegionTransformerBlock.__qualname__ = "RegionTransformerBlock"  # where pickle looks for it: this module
    RegionTransformerBlock.__module__ = __name__
    return RegionTransformerBlock


def __getattr__(name: str) -> Any:
    if name == "RegionTransformerBlock":
        return _region_block_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compile_transformer_blocks_once(model: Any) -> int:
    """Mark every transformer block of `model` as a nested compile region; returns how many were marked.

    In eager mode a region is an ordinary call, so marking changes no result; compiled, it changes what is
    traced and compiled, not the arithmetic of any kernel."""
    from diffusers.models.attention import BasicTransformerBlock

    region_class = _region_block_class()
    marked = 0
    for module in model.modules():
        if type(module) is BasicTransformerBlock:
            module.__class__ = region_class
            marked += 1
    return marked
