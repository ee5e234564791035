"""What the fused GEGLU kernels (engine/fp8_geglu.py, engine/bf16_geglu.py) share: whether Triton is here,
recognising the feed-forward they replace, and laying out the operands their TMA reads take."""

from __future__ import annotations

import importlib.util

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention import FeedForward
from torch import nn


def triton_available() -> bool:
    """Whether the fused kernels can run on a CUDA GPU here (torch's CUDA builds ship Triton)."""
    return importlib.util.find_spec("triton") is not None


def geglu_feed_forward_parts(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(first linear, second linear) of a diffusers FeedForward made of GEGLU with exact gelu (erf, what both
    kernels compute; "geglu-approximate" is another class), dropout and a linear; None for any other module."""
    if type(module) is not FeedForward:
        return None
    net = list(module.net)
    if len(net) not in (3, 4) or not all(isinstance(m, nn.Dropout) for m in net[1:2] + net[3:]):
        return None
    geglu = net[0]
    return (geglu.proj, net[2]) if type(geglu) is GEGLU else None


def aligned_for_tma(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor as TMA can read it: contiguous, starting on a 16-byte boundary (a view into a larger buffer
    may not), copied only where it is not already."""
    return [
        t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)
        for t in tensors
    ]
