"""Which fused kernel runs scaled_dot_product_attention (IMAGESMITH_ATTENTION_BACKEND).

'auto' leaves the choice to torch, and torch's choice depends on its build: torch 2.11 with cuDNN 9.19 on an
H200 runs cuDNN's attention first (it decides this lazily, at the first attention call, on Hopper and
Blackwell with a recent cuDNN; elsewhere flash attention comes first). Measured in docs/benchmarks.md, runs
19-23: on SDXL's shapes (head dim 64) cuDNN's kernel takes 4.5 ms of a compiled base UNet call where flash
takes 7.2 ms, so 'auto' is already the fast choice there. The setting pins the kernel where torch's default
differs (an older cuDNN, TORCH_CUDNN_SDPA_PREFERRED=0, another GPU) or for an A/B.

Every backend computes the same softmax(QK^T)V to within bf16 rounding. The chosen backend goes to the front
of torch's priority list and the others stay behind it: a shape it does not take (the VAE's single 512-wide
head) still runs on the next fused kernel instead of failing.

The choice must be in force whenever the UNets run, warm-up included: torch.compile records the kernel chosen
while it traces, so the engine enters `attention_priority` around every generation, and each choice keeps its
own compile cache (engine/fast.py, compile_cache_for).
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
    """The backend order for a plan's `attention` value; None keeps torch's own order ('auto', and 'fa4', whose
    processors call their kernel directly and leave SDPA to the VAE)."""
    if choice in ("auto", "fa4"):
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
