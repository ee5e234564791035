"""benchmarks/kernel_kinds.py (the profiler's kernel classifier) loaded as a module, for the tests that use it:
the benchmarks folder is not a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

KERNEL_KINDS = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_kinds.py"


def load_kernel_kinds() -> ModuleType:
    """A fresh module object each call (not put in sys.modules: a caller that needs that sets it)."""
    spec = importlib.util.spec_from_file_location("kernel_kinds", KERNEL_KINDS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
