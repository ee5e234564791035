"""Which fused kernel runs scaled_dot_product_attention (IMAGESMITH_ATTENTION_BACKEND).

torch tries flash attention first on CUDA and cuDNN's attention last, so cuDNN's is never picked unless asked
for. Every backend computes the same softmax(QK^T)V to within bf16 rounding, so the choice is a speed lever
(measured in docs/benchmarks.md, run 19). The chosen backend goes to the front of torch's priority list and
the others stay behind it: a shape it does not take (the VAE's single 512-wide head, CLIP's masked attention)
still runs on the next fused kernel instead of failing.

The choice must be in force whenever the UNets run, warm-up included: torch.compile records the backend
chosen while it traces, so the engine enters `attention_priority` around every generation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
_FALLBACKS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def priority_for(choice: str) -> list[SDPBackend] | None:
    """The backend order for a plan's `attention` value; None keeps torch's own order ('auto')."""
    if choice == "auto":
        return None
    first = _BACKENDS[choice]
    return [first, *(backend for backend in _FALLBACKS if backend is not first)]


@contextmanager
def attention_priority(choice: str) -> Iterator[None]:
    """Run the body with `choice` tried first. The flags are process-wide, hence one generation at a time
    (the engine's lock) and restored on exit."""
    order = priority_for(choice)
    if order is None:
        yield
        return
    with sdpa_kernel(order, set_priority=True):
        yield
