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
