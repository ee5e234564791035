"""The benchmarks' kernel classifier (benchmarks/kernel_kinds.py): its docstring's examples are real kernel
names from run 72's profile, where an earlier order of the kinds counted cuBLAS's matmuls as convolutions, and a
name in the form of inductor's matmul templates (max_autotune), which must not count as pointwise Triton work."""

import doctest
import sys

import pytest

from tests.kernel_kinds_module import load_kernel_kinds


def test_each_example_kernel_gets_its_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_kernel_kinds()
    # doctest counts only the functions whose module name resolves to this very module: another copy already
    # imported as "kernel_kinds" (a benchmark imported by an earlier test) would leave it none to run.
    monkeypatch.setitem(sys.modules, "kernel_kinds", module)
    result = doctest.testmod(module)
    assert result.attempted >= 5 and result.failed == 0
    assert module.kind_of("void at::native::vectorized_layer_norm_kernel<c10::BFloat16>") == "other"


class _Kernel:
    def __init__(self, name: str) -> None:
        self.name = name


class _Event:
    """What the benchmarks read of a torch profiler host event."""

    def __init__(
        self,
        name: str,
        parent: "_Event | None" = None,
        kernels: tuple[str, ...] = (),
        shapes: object = (),
        device_type: str = "DeviceType.CPU",
    ) -> None:
        self.name, self.cpu_parent, self.input_shapes = name, parent, list(shapes)
        self.kernels = [_Kernel(k) for k in kernels]
        self.device_type = device_type


def test_memsets_are_counted_under_the_innermost_operator_that_queued_them() -> None:
    module = load_kernel_kinds()
    outer = _Event("aten::scaled_dot_product_attention", shapes=[[2, 10, 4096, 64]])
    inner = _Event("aten::_scaled_dot_product_cudnn_attention", outer, shapes=[[2, 10, 4096, 64]])
    conv = _Event("aten::convolution", shapes=[[2, 640, 64, 64]])
    events = [
        outer,
        inner,
        _Event("cudaMemsetAsync", inner, ("Memset (Device)",)),
        _Event("cudaMemsetAsync", inner, ("Memset (Device)",)),
        _Event("cudaLaunchKernel", inner, ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop",)),
        conv,
        _Event("cuMemsetD32Async", conv, ("memset32",)),
        _Event("cudaMemsetAsync", None, ("Memset (Device)",)),  # queued outside any operator
        # What the device ran: the four above and one that no host event holds.
        *[_Event("Memset (Device)", device_type="DeviceType.CUDA") for _ in range(4)],
        _Event("memset32", device_type="DeviceType.CUDA"),
        _Event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", device_type="DeviceType.CUDA"),
    ]
    counts = module.memsets_by_operator(events)
    assert counts == {
        "aten::_scaled_dot_product_cudnn_attention [[2, 10, 4096, 64]]": 2,
        "aten::convolution [[2, 640, 64, 64]]": 1,
        "cudaMemsetAsync []": 1,
        "(not linked)": 1,
    }
    assert next(iter(counts)).startswith("aten::_scaled_dot_product_cudnn_attention")  # most first
