"""A hand-picked GPU kernel checked once against a reference before the engine relies on it (bf16_geglu.py,
fa4_attention.py): a kernel that does not compile or run on this card, or computes wrongly there, is found at
start-up, in a line, rather than inside a warm-up's CUDA-graph capture."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# bf16 rounding alone puts a kernel ~3e-3 (relative L2) from its fp32 reference (runs 97 and 112).
BF16_BOUND = 1e-2


def output_fault(run: Callable[[], torch.Tensor], expected: torch.Tensor, reference: str) -> str | None:
    """run() (the kernel, on its device) against `expected` (computed in fp32 on the CPU, named `reference` in
    the message): None where they agree within bf16 rounding, else what went wrong, in a line."""
    try:
        got = run().float().cpu()
    except Exception as error:  # not installed, a compile error, out of resources, a driver error: "not here"
        first_line = next(iter(str(error).strip().splitlines()), "")
        return f"{type(error).__name__}: {first_line}"[:300]
    if got.shape != expected.shape:
        return f"its output has shape {tuple(got.shape)}, not {tuple(expected.shape)}"
    error_l2 = float((got - expected).norm() / expected.norm())
    if not math.isfinite(error_l2) or error_l2 > BF16_BOUND:
        return f"its output is off {reference} by {error_l2:.1e} (relative L2; bf16 rounding is ~3e-3)"
    return None
