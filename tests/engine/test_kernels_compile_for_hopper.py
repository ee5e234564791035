"""Our Triton kernels compile for an H100 (sm_90), at every autotuning config, without a GPU.

Triton's interpreter (the CPU tests' other check) never builds the kernel: it missed a jit helper annotated with
typing.Any, which Triton refuses to compile, and that cost a device call (session 43). This compiles each kernel
through Triton's real pipeline (its AST to TTIR, TTGIR, PTX and, with the ptxas Triton ships, a cubin) for the
target the engine plans it on, and checks each config fits an H100's shared memory, which on the GPU would only
show as a config the autotuner drops.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from imagesmith.engine import bf16_geglu_kernel, fp8_geglu_kernel

HOPPER = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY_PER_BLOCK = 227 * 1024  # the opt-in maximum a block may ask for on sm_90


def _compile(autotuner: Any, config: triton.Config, signature: dict[str, str], flags: dict[str, bool]) -> Any:
    constants = {**config.kwargs, **flags}
    signature = {**signature, **{name: "constexpr" for name in constants}}
    source = ASTSource(autotuner.fn, signature, constants)
    return triton.compile(
        source, target=HOPPER, options={"num_warps": config.num_warps, "num_stages": config.num_stages}
    )


def _descriptors(element: str, config: triton.Config, weight_rows_per_column: int) -> dict[str, str]:
    bm, bn, bk = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return {
        "x_desc": f"tensordesc<{element}[{bm}, {bk}]>",
        "w_desc": f"tensordesc<{element}[{weight_rows_per_column * bn}, {bk}]>",
        "out_desc": f"tensordesc<{element}[{bm}, {bn}]>",
    }


@pytest.mark.parametrize(
    ("config_index", "bias"), list(itertools.product(range(len(bf16_geglu_kernel._CONFIGS)), (False, True)))
)
def test_the_bf16_geglu_kernel_compiles_for_hopper(config_index: int, bias: bool) -> None:
    config = bf16_geglu_kernel._CONFIGS[config_index]
    signature = {
        **_descriptors("bf16", config, weight_rows_per_column=2),
        "bias_ptr": "*bf16",
        "M": "i32",
        "N": "i32",
        "K": "i32",
    }
    kernel = _compile(bf16_geglu_kernel._bf16_geglu_kernel, config, signature, {"HAS_BIAS": bias})
    assert "wgmma" in kernel.asm["ptx"]  # Hopper's tensor-core matmul, not a fallback
    assert kernel.metadata.shared <= H100_SHARED_MEMORY_PER_BLOCK, config


@pytest.mark.parametrize(
    ("config_index", "bias"), list(itertools.product(range(len(fp8_geglu_kernel._CONFIGS)), (False, True)))
)
def test_the_fp8_geglu_kernel_compiles_for_hopper(config_index: int, bias: bool) -> None:
    config = fp8_geglu_kernel._CONFIGS[config_index]
    signature = {
        **_descriptors("fp8e4nv", config, weight_rows_per_column=1),
        "bias_ptr": "*bf16",
        "descale_ptr": "*fp32",
        "out_scale_ptr": "*fp32",
        "M": "i32",
        "N": "i32",
        "K": "i32",
    }
    kernel = _compile(fp8_geglu_kernel._fp8_geglu_kernel, config, signature, {"HAS_BIAS": bias})
    assert "wgmma" in kernel.asm["ptx"]
    assert kernel.metadata.shared <= H100_SHARED_MEMORY_PER_BLOCK, config
